"""Fifty-two bad inputs to ``preftune train``: each must end in one line naming what is wrong, exit code 2.

``CASES`` maps a case name to ``make(tmp_path, base) -> (config, overrides)``, where ``base`` is the
conftest ``base_config`` factory and ``config`` a dict (written as YAML), raw YAML text (``str``) or a
path that does not exist (``None``). Used by test_bad_input.py and scripts/fault_injection.py.
"""

from __future__ import annotations

import json

from .conftest import arithmetic_rows, write_jsonl


def _config(**overrides):
    return lambda tmp, base: (base(**overrides), [])


def _override(*args):
    return lambda tmp, base: (base(), list(args))


def _data(name: str, text: str | bytes, **data):
    """A training file with this content (and other data keys)."""

    def make(tmp, base):
        path = tmp / name
        (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
        return base(data={"train": str(path), **data}), []

    return make


def _rows(edit, name="rows.jsonl", **data):
    """Eight good pairs changed by ``edit(rows)`` (which may return new rows)."""

    def make(tmp, base):
        rows = arithmetic_rows(8, seed=3)
        rows = edit(rows) or rows
        return base(data={"train": write_jsonl(tmp / name, rows), **data}), []

    return make


def _set(index, key, value):
    def edit(rows):
        rows[index][key] = value

    return edit


def _rename(old, new):
    return lambda rows: [{(new if k == old else k): v for k, v in r.items()} for r in rows]


def _no_weights_reference(tmp, base):
    """A reference directory with a config and tokenizer but no weight files."""
    import shutil

    source = base()["model"]
    ref = tmp / "no-weights"
    shutil.copytree(source, ref)
    for f in list(ref.glob("*.safetensors")) + list(ref.glob("*.bin")):
        f.unlink()
    return base(method="mrpo", references=["policy", str(ref)]), []


def _empty_model_dir(tmp, base):
    (tmp / "empty-model").mkdir()
    return base(model=str(tmp / "empty-model")), []


_GOOD = json.dumps(arithmetic_rows(1)[0])

CASES = {
    # --- configuration: names, ranges, compositions (validated before anything is loaded)
    "method-unknown": _config(method="foo"),
    "method-typo": _config(method="mrp"),
    "method-mrpo-without-references": _config(method="mrpo"),
    "method-two-reference-slots": _config(method="mrpo+mdpo", references=["policy", "x"]),
    "method-two-pairings": _config(method="rpo+rpo_unpaired"),
    "references-with-dpo": _config(references=["policy", "other"]),
    "reference-free-with-mrpo": _config(method="mrpo", references=["policy", "x"], reference_free=True),
    "logging-steps-0": _config(logging_steps=0),
    "rpo-tau-0": _config(rpo__tau=0),
    "learning-rate-negative": _config(learning_rate=-1),
    "learning-rate-nan": _config(learning_rate=float("nan")),
    "label-smoothing-2": _config(label_smoothing=2),
    "max-steps-0": _config(max_steps=0),
    "max-steps-minus-5": _config(max_steps=-5),
    "epochs-0": _config(max_steps=-1, epochs=0),
    "save-steps-negative": _config(save_steps=-1),
    "eval-steps-negative": _config(eval_steps=-2),
    "phi-star-0": _config(mallows__phi_star=0),
    "phi-star-negative": _config(mallows__phi_star=-0.5),
    "beta-0": _config(beta=0),
    "batch-size-0": _config(batch_size=0),
    "warmup-ratio-2": _config(warmup_ratio=2),
    "adam-betas-one-number": _config(adam_betas=[0.9]),
    "lr-scheduler-unknown": _config(lr_scheduler="step"),
    "precision-unknown": _config(precision="fp8"),
    "on-nonfinite-unknown": _config(on_nonfinite="ignore"),
    "data-on-error-unknown": _config(data__on_error="ignore"),
    "unknown-key": _config(lerning_rate=1e-3),
    "unknown-nested-key": _config(mrpo__clip=0.1),
    "override-unknown-key": _override("bta=0.1"),
    "override-without-equals": _override("beta"),
    "override-not-a-number": _override("beta=abc"),
    "override-bad-range": _override("max_grad_norm=-1"),
    "yaml-syntax": lambda tmp, base: ("model: [unclosed\n", []),
    "yaml-not-a-mapping": lambda tmp, base: ("- a\n- b\n", []),
    "config-file-missing": lambda tmp, base: (None, []),
    # --- data (checked before any model loads)
    "train-file-missing": lambda tmp, base: (base(data={"train": str(tmp / "missing.jsonl")}), []),
    "eval-file-missing": lambda tmp, base: (
        base(data={"train": base()["data"]["train"], "eval": "nope.jsonl"}),
        [],
    ),
    "train-file-empty": _data("empty.jsonl", ""),
    "invalid-json-line": _data("bad.jsonl", _GOOD + "\n" + '{"prompt": "x", "chosen": "y"\n' + _GOOD + "\n"),
    "not-utf8": _data("latin1.jsonl", (_GOOD + "\n").encode() + '{"prompt": "caf\xe9"}\n'.encode("latin-1")),
    "csv-broken-quote": _data("broken.csv", 'prompt,chosen,rejected\n"What is 1+1?,2,3\nok,a,b\n'),
    "missing-column": _rows(_rename("chosen", "chosen_response")),
    "missing-every-column": _rows(lambda rows: [{"question": 1, "good": 2, "bad": 3} for _ in rows]),
    "empty-completion": _rows(_set(3, "rejected", [{"role": "assistant", "content": ""}])),
    "completion-wrong-type": _rows(_set(2, "chosen", 42)),
    "column-mapping-to-nothing": _rows(lambda rows: None, columns={"chosen": "answer"}),
    # --- models and sizes
    "model-path-missing": _config(model="/no/such/model-dir"),
    "model-dir-without-weights": _empty_model_dir,
    "reference-without-weights": _no_weights_reference,
    "fewer-examples-than-a-batch": _config(batch_size=64),
    "prompts-over-max-length": _config(max_length=8),  # found while tokenizing, before any weights load
}
