"""What each held-out metric is measured against: its yardstick, named for one run.

Held-out metrics come in families that differ in what they compare the trained policy with:

- ``eval_loss`` and TRL's ``eval_rewards/*``: the method's own reference. For DPO and its relatives
  that is the initial policy (reference 0); for MRPO the *virtual* reference (the references'
  log-probs, clipped into the primary's trust region and weighted); for MDPO the weighted mean of
  the references; for reference-free methods (SimPO, ORPO) there is none.
- ``eval_initial/rewards/*``: the initial policy, whatever the method: the same yardstick for every
  run, so these are the numbers to compare methods by (0.5 accuracy and 0 margin before training).
- ``eval_logps/*``: no reference, the policy's own log-probs.
- ``eval_answer_*``: greedy answers checked against the data's ``answer``.

MRPO's step-0 ``eval_loss`` is therefore not ln 2: the policy is the initial policy, but the virtual
reference is not, so the rewards against it are not 0 before training.

:func:`yardsticks` names them from a config; :func:`run_yardsticks` from a run directory's
config.yaml (falling back to the general wording when it cannot be read); :func:`yardstick` picks
the one of a metric key; :func:`group_by_yardstick` orders keys under their yardstick, as the closing
table of ``train``/``eval`` and ``preftune report`` print them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

INITIAL = "eval_initial/"
METHOD = "eval_rewards/"
LOSS = "eval_loss"
OWN = "eval_logps/"
ANSWERS = "eval_answer_"
OLD_PRIMARY = "eval_primary/"  # runs of earlier versions: rewards against reference 0

# The families in the order they are shown, with what they are when nothing more is known.
GENERAL = {
    INITIAL: "the initial policy",
    LOSS: "the method's reference",
    METHOD: "the method's reference",
    OLD_PRIMARY: "reference 0 (the primary; the initial policy unless references say otherwise)",
    OWN: "no reference (the policy's own log-probs)",
    ANSWERS: "the data's answers (greedy generation)",
}


def _method_reference(method: Any, reference_free: bool, refs: list[str]) -> str:
    primary = "the initial policy" if refs[0] == "policy" else f"reference 0 ({refs[0]})"
    if reference_free:
        return "no reference (reference-free rewards)"
    if method.reference.value == "mrpo":
        return f"the MRPO virtual reference of the {len(refs)} references"
    if method.reference.value == "mdpo":
        return f"the α-weighted mean of the {len(refs)} references (MDPO)"
    return primary


def yardsticks(cfg) -> dict[str, str]:
    """Family prefix -> what it is measured against, for the run of ``cfg`` (a TrainConfig)."""
    from .config import resolved_method

    spec = resolved_method(cfg)
    refs = [r.model for r in cfg.references] or ["policy"]
    method_ref = _method_reference(spec, spec.reference_free or cfg.reference_free, refs)
    return {
        INITIAL: "the initial policy",
        LOSS: method_ref,
        METHOD: method_ref,
        OLD_PRIMARY: "the initial policy" if refs[0] == "policy" else f"reference 0 ({refs[0]})",
        OWN: GENERAL[OWN],
        ANSWERS: GENERAL[ANSWERS],
    }


def run_yardsticks(run_dir: str | Path) -> dict[str, str]:
    """:func:`yardsticks` of a run directory's config.yaml; the general wording if it cannot be read."""
    path = Path(run_dir) / "config.yaml"
    try:
        from .config import load_config

        return yardsticks(load_config(path))
    except Exception:  # a run of another version, a moved model: say what is always true
        return dict(GENERAL)


def family(key: str) -> str | None:
    """The family prefix of a metric key (None for keys of no family, e.g. ``eval_n``)."""
    if key == "eval_prompts_n":
        return ANSWERS
    for prefix in GENERAL:
        if key == prefix or (prefix.endswith(("/", "_")) and key.startswith(prefix)):
            return prefix
    return None


def yardstick(key: str, sticks: dict[str, str] | None = None) -> str:
    """What metric ``key`` is measured against ('' for keys of no family)."""
    prefix = family(key)
    return (sticks or GENERAL).get(prefix, "") if prefix else ""


def group_by_yardstick(keys, sticks: dict[str, str] | None = None) -> list[tuple[str, list[str]]]:
    """(yardstick, keys) in display order: the initial policy first, then the method's reference,
    no reference, the answers; keys of no family last, under ''. Families with the same yardstick
    share a group (DPO: the method's reference is the initial policy)."""
    sticks = sticks or GENERAL
    by_family: dict[str, list[str]] = {}
    for key in keys:
        by_family.setdefault(family(key) or "", []).append(key)
    groups: dict[str, list[str]] = {}
    for prefix in (INITIAL, LOSS, METHOD, OLD_PRIMARY, OWN, ANSWERS, ""):
        if prefix in by_family:
            text = sticks.get(prefix, GENERAL.get(prefix, "")) if prefix else ""
            groups.setdefault(text, []).extend(by_family[prefix])
    if "" in groups:  # keys of no family stay last
        groups[""] = groups.pop("")
    return list(groups.items())


def differs_from_initial(sticks: dict[str, str]) -> bool:
    """Whether the method's reference is not the initial policy (MRPO, MDPO, reference-free, or a
    reference 0 other than the policy): then its ``eval_loss`` is not ln 2 and its ``eval_rewards/*``
    not 0.5 / 0 before training, and ``eval_initial/*`` is the number to compare runs by."""
    return sticks.get(METHOD, GENERAL[METHOD]) not in (sticks.get(INITIAL), GENERAL[METHOD])


def yardstick_note(sticks: dict[str, str]) -> str | None:
    """The closing table's line for a run whose method's reference is not the initial policy."""
    if not differs_from_initial(sticks):
        return None
    return (
        f"note: eval_loss and eval_rewards/* are measured against {sticks[METHOD]}, not the initial "
        "policy, so before training they need not be ln 2 and 0.5; eval_initial/* (against the initial "
        "policy) compares across methods"
    )


class InitialScores:
    """The initial policy's log-probs of one held-out split, per side: the yardstick of
    ``eval_initial/*`` when no reference is the initial policy. Measured at the step-0 evaluation and
    kept in memory and in ``path`` (``held_out_initial.json``, with the data source and row count
    they are of), so a resumed run or ``preftune eval`` on the same data compares with the same
    numbers."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._kept: tuple[str, str, dict] | None = None  # (split, source, log-probs per side)

    def keep(self, split: str, source: str, logps: dict, *, write: bool) -> None:
        """Keep ``logps`` (``write``: also in :attr:`path`, replaced atomically; the main process)."""
        import json
        import os

        self._kept = (split, source, logps)
        if not write:
            return
        record = {"source": source, "n": len(logps["chosen"]), **{s: v.tolist() for s, v in logps.items()}}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.path)

    def get(self, split: str, source: str, rows: int) -> dict | None:
        """The kept log-probs of ``split`` (from memory, or :attr:`path` when they are of the same
        source and rows); None when unknown (then ``eval_initial/*`` is left out)."""
        import json

        import torch

        kept = self._kept
        if kept is not None and kept[:2] == (split, source) and len(kept[2]["chosen"]) == rows:
            return kept[2]
        try:
            record = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        if record.get("source") != source or record.get("n") != rows:
            return None
        logps = {side: torch.tensor(record[side], dtype=torch.float32) for side in ("chosen", "rejected")}
        self._kept = (split, source, logps)
        return logps
