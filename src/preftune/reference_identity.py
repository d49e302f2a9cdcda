"""When two configured references are the same reference: the check behind ``references:``'s refusal.

MRPO/MDPO over K references that score every response alike is DPO with K times the scoring work
(ARWC weights are uniform and CTRO clipping changes nothing). Two entries are the same when they name
the same model and would score it the same way: the same chat template and the same dtype. The keyword
``policy`` is the initial policy, so it equals an entry naming the policy's own path. Paths are
compared after resolving them (``./m`` and ``/abs/m``, symlinks); preset names as written.

Imports nothing of preftune, so :mod:`preftune.config` can use it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

POLICY = "policy"

_DTYPE_ALIASES = {
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float": "float32",
    "fp64": "float64",
    "double": "float64",
}


def model_identity(model: str | None) -> str:
    """A model path resolved (existing paths), or the name as written (presets, hub names)."""
    if model is None:
        return POLICY
    text = str(model).strip()
    expanded = os.path.expanduser(text)
    if os.path.exists(expanded):
        return os.path.normcase(os.path.realpath(expanded))
    return text


def _dtype(dtype: str | None) -> str | None:
    if dtype is None:
        return None
    name = str(dtype).strip().lower().removeprefix("torch.")
    return _DTYPE_ALIASES.get(name, name)


def reference_key(
    policy_model: str | None, reference: Any, policy_template: str | None = None
) -> tuple[str, str | None, str | None]:
    """(model identity, chat template, dtype) of one reference entry (a ``ReferenceConfig``).

    ``policy`` scores exactly as the policy does: its model, the policy's template
    (``data.chat_template``, ``policy_template``) and the run's dtype.
    """
    if reference.model == POLICY:
        return model_identity(policy_model), policy_template, None
    return model_identity(reference.model), reference.chat_template, _dtype(reference.dtype)


def policy_entry_error(references: Sequence[Any]) -> str | None:
    """A ``policy`` entry that sets ``chat_template`` or ``dtype``: they do not apply to it (it is
    scored by the policy itself), so they are refused instead of ignored."""
    for i, reference in enumerate(references):
        if reference.model == POLICY:
            extra = [k for k in ("chat_template", "dtype") if getattr(reference, k) is not None]
            if extra:
                return (
                    f"references[{i}]: the `policy` reference is scored by the policy itself (its chat "
                    f"template, the run's dtype); remove {' and '.join(extra)}, or name the model's path "
                    "to score a copy of it another way"
                )
    return None


def duplicate_references(
    policy_model: str | None, references: Sequence[Any], policy_template: str | None = None
) -> tuple[tuple[int, int], str] | None:
    """The first pair of entries (i < j) that are the same reference, with a description of it; None
    when all differ."""
    seen: dict[tuple[str, str | None, str | None], int] = {}
    for j, reference in enumerate(references):
        key = reference_key(policy_model, reference, policy_template)
        if key in seen:
            i = seen[key]
            names = {references[i].model, reference.model}
            if POLICY in names:
                what = "the initial policy" + (
                    f", {policy_model}" if policy_model and names != {POLICY} else ""
                )
            else:
                what = f"model {reference.model}"
            return (i, j), what
        seen[key] = j
    return None


def initial_policy_index(
    policy_model: str | None, references: Sequence[Any], policy_template: str | None = None
) -> int | None:
    """Index of the first reference that is the initial policy (the keyword ``policy``, or an entry
    naming the policy's own model scored the same way); 0 when none is configured (the default is
    ``[policy]``); None when no reference is the initial policy."""
    if not references:
        return 0
    target = (model_identity(policy_model), policy_template, None)
    for i, reference in enumerate(references):
        if reference_key(policy_model, reference, policy_template) == target:
            return i
    return None
