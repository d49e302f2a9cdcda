"""experiments/method_comparison: what the full study relies on, on tiny random models (--quick)."""

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parents[1] / "experiments" / "method_comparison"


def _load(name):
    sys.path.insert(0, str(HERE))
    spec = importlib.util.spec_from_file_location(f"method_comparison_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


run = _load("run")
analysis = _load("analysis")


def _check_study(out: Path, study, arms: list[str]) -> list[dict]:
    records = analysis.load(out / "results.jsonl")
    splits = json.loads((out / "data" / "splits.json").read_text())
    test_ids, val_ids = set(splits["test"]), set(splits["validation"])
    assert not test_ids & set(splits["validation"])
    main = [r for r in records if r["kind"] == "main"]
    sweep = [r for r in records if r["kind"] == "sweep"]
    # every arm trained in every regime and seed, finite losses
    expected = {(a, reg, s) for a in arms for reg in study.regimes for s in study.seeds[reg]}
    assert {(r["arm"], r["regime"], r["seed"]) for r in main} == expected
    assert all(np.isfinite(r["train"]["final_loss"]) and r["train"]["steps"] >= 1 for r in main)
    # quick studies train with one thread (the runner's choice reaches preftune, which does not override it)
    assert {r["machine"]["torch_threads"] for r in records} == {1}
    # the SAME held-out test rows for every arm; never trained on
    rows = {tuple(r["per_row"]["rows"]) for r in main}
    assert rows == {tuple(splits["test"])}
    for r in main:
        assert not set(r["train_rows"]) & (test_ids | val_ids)
        assert len(r["per_row"]["exact_match"]) == len(r["per_row"]["rows"]) == study.test_rows
    # selection read the validation split only: sweep runs saw validation rows and never loaded test
    assert sweep and all(r["split"] == "validation" and set(r["per_row"]["rows"]) <= val_ids for r in sweep)
    for r in sweep:
        cfg = (out / "runs" / r["run"] / "train" / "config.yaml").read_text()
        assert "validation.jsonl" in cfg and "test.jsonl" not in cfg
    for r in main:
        if r["eps"] is not None:
            assert r["eps"] == analysis.selected_eps(out / "results.jsonl", r["arm"], study.eps_grid)
        if r.get("sft_weight") is not None:
            assert r["sft_weight"] == analysis.selected_sft(out / "results.jsonl", r["arm"], study.sft_grid)
    # CIs cover the point estimates; paired differences against DPO exist for the other arms
    summary = analysis.summarise(records, study.bootstrap)
    for (regime, arm), e in summary.items():
        for metric, (point, lo, hi) in e["metrics"].items():
            assert lo <= point <= hi, (regime, arm, metric)
        if arm != "dpo":
            assert set(e["diff"]) == {"exact_match", "preference_accuracy"}
    text = (out / "RESULTS.md").read_text()
    assert "missing (not run yet)" in text or set(arms) == set(run.ARM_NAMES)
    # the untrained policy's answers to the same test rows: the "before" row of every table
    before = json.loads((out / "initial" / "test-generation.json").read_text())
    assert before["rows"] == splits["test"] and len(before["exact_match"]) == study.test_rows
    assert text.count("*initial policy, untrained*") == len(study.regimes)
    return records


def _small(study, **kw):
    return dataclasses.replace(study, **kw)


def test_quick_subset_trains_measures_selects_on_validation_and_resumes(tmp_path):
    study = _small(
        run.QUICK, regimes={"scarce": 8}, seeds={"scarce": (0,)}, eps_grid=(0.1, 1.0), bootstrap=100
    )
    arms = ["dpo", "mrpo_val2"]
    out = run.run_study(out=tmp_path / "study", arms=arms, study=study)
    records = _check_study(out, study, arms)
    mrpo = next(r for r in records if r["kind"] == "main" and r["arm"] == "mrpo_val2")
    assert "clip_fraction" in mrpo["train"] and len(mrpo["train"]["validation_weights"]) == 2
    # resume: a rerun trains nothing and appends nothing
    before = (out / "results.jsonl").read_text()
    run.run_study(out=out, arms=arms, study=study)
    assert (out / "results.jsonl").read_text() == before
    # a missing marker reruns just that run
    (out / "runs" / mrpo["run"] / "done.json").unlink()
    run.run_study(out=out, arms=arms, study=study, max_runs=1)
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == len(before.splitlines()) + 1 and json.loads(lines[-1])["run"] == mrpo["run"]


def test_sft_term_lambda_is_chosen_on_validation_answers(tmp_path):
    """DPO+SFT: every λ trains on validation and answers its problems; the main run uses the λ with
    the best validation exact match, and the SFT-only arm trains without a preference term."""
    study = _small(
        run.QUICK, regimes={"scarce": 8}, seeds={"scarce": (0,)}, sft_grid=(0.5, 2.0), bootstrap=50
    )
    arms = ["dpo", "sft", "dpo_sft"]
    out = run.run_study(out=tmp_path / "study", arms=arms, study=study)
    records = _check_study(out, study, arms)
    sweep = {r["sft_weight"]: r for r in records if r["kind"] == "sweep"}
    assert set(sweep) == {0.5, 2.0} and all(r["arm"] == "dpo_sft" for r in sweep.values())
    for lam, r in sweep.items():  # answered the validation problems, and trained with its own λ
        assert len(r["per_row"]["exact_match"]) == study.val_rows
        cfg = (out / "runs" / r["run"] / "train" / "config.yaml").read_text()
        assert f"sft_weight: {lam}" in cfg
    main = {r["arm"]: r for r in records if r["kind"] == "main"}
    assert main["dpo_sft"]["sft_weight"] in (0.5, 2.0) and main["dpo"]["sft_weight"] is None
    # the SFT term shows in the training metrics of the DPO+SFT runs only
    logged = (out / "runs" / main["dpo_sft"]["run"] / "train" / "metrics.jsonl").read_text()
    assert '"nll_loss"' in logged
    assert '"nll_loss"' not in (out / "runs" / main["dpo"]["run"] / "train" / "metrics.jsonl").read_text()
    text = (out / "RESULTS.md").read_text()
    assert (
        "λ of the SFT term chosen on the validation split" in text
        and f"λ={main['dpo_sft']['sft_weight']:g}" in text
    )


def test_two_processes_share_the_study_without_running_anything_twice(tmp_path):
    """--workers: each run is claimed by one process; a main run waits for the ε sweep the other runs."""
    import os
    import subprocess

    out = tmp_path / "study"
    child = (
        "import dataclasses, sys; sys.path.insert(0, sys.argv[1]); import run; "
        "study = dataclasses.replace(run.QUICK, regimes={'scarce': 8}, seeds={'scarce': (0,)}, "
        "eps_grid=(0.1, 1.0), bootstrap=50); "
        "run.run_study(out=sys.argv[2], arms=['dpo', 'mrpo_val2'], study=study, threads=1, poll_s=0.5)"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", child, str(HERE), str(out)], env=env) for _ in range(2)]
    try:
        assert [p.wait(timeout=600) for p in procs] == [0, 0]
    finally:
        for p in procs:
            p.kill()
    records = analysis.load(out / "results.jsonl")
    ids = [r["run"] for r in records]
    assert len(ids) == len(set(ids)) == 4  # two sweep runs, two main runs: each exactly once
    main = {r["arm"]: r for r in records if r["kind"] == "main"}
    assert main["mrpo_val2"]["eps"] == analysis.selected_eps(out / "results.jsonl", "mrpo_val2", (0.1, 1.0))
    # every arm was measured on the same rows against the same cached initial policy
    assert main["dpo"]["per_row"]["rows"] == main["mrpo_val2"]["per_row"]["rows"]
    assert (out / "initial" / "test.json").exists() and (out / "initial" / "validation.json").exists()


@pytest.mark.slow
def test_quick_study_every_arm(tmp_path):
    out = run.run_study(quick=True, out=tmp_path / "study")
    _check_study(out, run.QUICK, list(run.ARM_NAMES))


def _record(kind, arm, seed, values, rows, split="test", eps=None, regime="scarce"):
    return {
        "kind": kind,
        "run": f"{kind}-{arm}-{seed}-{eps}",
        "arm": arm,
        "regime": regime,
        "seed": seed,
        "eps": eps,
        "split": split,
        "per_row": {"rows": rows, **{m: list(values) for m, _ in analysis.METRICS}},
        "train": {},
        "seconds": 1.0,
        "machine": {"host": "h", "cpus": 2},
    }


def test_bootstrap_paired_differences_and_selection_by_hand(tmp_path):
    rows = list(range(40))
    rng = np.random.default_rng(0)
    recs = []
    for seed in (0, 1, 2):
        base = rng.integers(0, 2, 40).astype(float)
        recs.append(_record("main", "dpo", seed, base, rows))
        better = base.copy()
        better[:10] = 1.0  # the arm solves the first 10 problems too
        recs.append(_record("main", "rpo", seed, better, rows))
    summary = analysis.summarise(recs, 500)
    dpo, rpo = summary["scarce", "dpo"], summary["scarce", "rpo"]
    point = np.mean([r["per_row"]["exact_match"] for r in recs if r["arm"] == "rpo"])
    assert rpo["metrics"]["exact_match"][0] == pytest.approx(point)
    lo, hi = rpo["metrics"]["exact_match"][1:]
    assert lo < point < hi and hi - lo < 0.4
    d = rpo["diff"]["exact_match"]
    assert d[0] == pytest.approx(rpo["metrics"]["exact_match"][0] - dpo["metrics"]["exact_match"][0])
    assert d[1] >= 0 and analysis.verdict(d).startswith(("holds", "inconclusive"))
    # an arm that answers exactly what DPO answers is no difference, not an inconclusive one
    same = analysis.summarise([*recs, *[{**r, "arm": "mdpo"} for r in recs if r["arm"] == "dpo"]], 100)
    assert analysis.verdict(same["scarce", "mdpo"]["diff"]["exact_match"]).startswith("no difference")
    # rows that differ between arms are an error, not a silent mismatch
    with pytest.raises(ValueError, match="other rows"):
        analysis.summarise([*recs, _record("main", "dpo", 3, np.zeros(40), rows[::-1])], 10)

    # λ selection: best validation exact match (not preference accuracy), ties to the smaller λ
    lam = [_record("sweep", "dpo_sft", 0, [0.0, 1.0], [7, 8], "validation") for _ in range(3)]
    for r, value, em in zip(lam, (0.3, 1.0, 3.0), ([0.0, 1.0], [1.0, 1.0], [1.0, 1.0])):
        r.update(sft_weight=value, run=f"sweep-dpo_sft-{value}")
        r["per_row"]["exact_match"] = em
    lam[0]["per_row"]["preference_accuracy"] = [1.0, 1.0]  # best preference accuracy, worst answers
    path = tmp_path / "lambda.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lam[:2]))
    assert analysis.selected_sft(path, "dpo_sft", (0.3, 1.0, 3.0)) is None  # λ=3 not run yet
    path.write_text("".join(json.dumps(r) + "\n" for r in lam))
    assert analysis.selected_sft(path, "dpo_sft", (0.3, 1.0, 3.0)) == 1.0

    # ε selection: best validation preference accuracy, ties to the smaller ε; test records ignored
    path = tmp_path / "results.jsonl"
    sweep = [
        _record("sweep", "mrpo_adaptive", 0, [0.5, 0.5], [7, 8], "validation", 0.1),
        _record("sweep", "mrpo_adaptive", 0, [1.0, 0.5], [7, 8], "validation", 0.3),
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in sweep))
    assert analysis.selected_eps(path, "mrpo_adaptive", (0.1, 0.3, 1.0)) is None  # 1.0 not run yet
    sweep.append(_record("sweep", "mrpo_adaptive", 0, [1.0, 0.5], [7, 8], "validation", 1.0))
    # a (hypothetical) test-split record with a perfect score must not influence the choice
    sweep.append(_record("main", "mrpo_adaptive", 0, [1.0, 1.0], [1, 2], "test", 1.0))
    path.write_text("".join(json.dumps(r) + "\n" for r in sweep) + '{"half a line')
    assert analysis.selected_eps(path, "mrpo_adaptive", (0.1, 0.3, 1.0)) == 0.3


def test_wall_time_is_the_union_of_running_intervals_minus_pauses(tmp_path):
    def rec(end, seconds):
        return {"finished": f"2026-01-01T{end}Z", "seconds": seconds}

    # two workers overlapping (00:00-00:10 and 00:07-00:12), then a later session (04:59-05:00)
    records = [rec("00:10:00", 600), rec("00:12:00", 300), rec("05:00:00", 60)]
    assert analysis.wall_hours(records) * 3600 == pytest.approx(12 * 60 + 60)
    pauses = tmp_path / "pauses.jsonl"
    pauses.write_text(
        json.dumps({"start": "2026-01-01T00:05:00Z", "end": "2026-01-01T00:06:00Z", "why": "benchmark"})
        + "\n"
        + json.dumps({"start": "2026-01-01T01:00:00Z", "end": "2026-01-01T02:00:00Z", "why": "idle anyway"})
        + "\n"
    )
    # only the part of a pause that overlaps running time is taken off
    assert analysis.wall_hours(records, analysis.load_pauses(pauses)) * 3600 == pytest.approx(12 * 60)


def test_differences_against_the_untrained_policy_are_paired_per_problem():
    rows = list(range(30))
    rng = np.random.default_rng(1)
    untrained = rng.integers(0, 2, 30).astype(float)
    recs = []
    for seed in (0, 1):
        trained = untrained.copy()
        trained[np.flatnonzero(untrained == 0)[: 5 + seed]] = 1.0  # solves 5 (6) more problems
        recs.append(_record("main", "dpo", seed, trained, rows))
    initial = {"rows": rows, "exact_match": untrained.tolist(), "reached_answer": untrained.tolist()}
    entry = analysis.summarise(recs, 300, initial)["scarce", "dpo"]
    point, lo, hi = entry["vs_initial"]["exact_match"]
    assert point == pytest.approx(5.5 / 30) and 0 < lo <= point <= hi  # every problem moved up or not at all
    with pytest.raises(ValueError, match="other rows than the untrained policy"):
        analysis.summarise(recs, 10, {**initial, "rows": rows[::-1]})


def test_a_grid_that_grew_keeps_only_the_main_runs_at_the_value_it_selects_now():
    """λ=3 was chosen, its main runs finished, then λ=10 joined the grid and won on validation: the
    tables read the λ=10 runs only (mixing both would average two different arms)."""
    arm = next(a for a in run.ARMS if a.sweep_sft)
    study = _small(run.FULL, sft_grid=(1.0, 3.0, 10.0))
    recs = []
    for value, em in ((1.0, [0.0, 0.0]), (3.0, [1.0, 0.0]), (10.0, [1.0, 1.0])):
        r = _record("sweep", arm.name, 0, em, [7, 8], "validation")
        r.update(sft_weight=value, run=f"sweep-{value}")
        recs.append(r)
    for value in (3.0, 10.0):
        for seed in (0, 1, 2):
            r = _record("main", arm.name, seed, [value / 10] * 4, [1, 2, 3, 4])
            r.update(sft_weight=value, run=f"main-{seed}-{value}")
            recs.append(r)
    recs.append(_record("main", "dpo", 0, [0.0] * 4, [1, 2, 3, 4]))
    kept = analysis.current(recs, run.ARMS, study)
    assert {r.get("sft_weight") for r in kept if r["kind"] == "main" and r["arm"] == arm.name} == {10.0}
    assert len([r for r in kept if r["kind"] == "sweep"]) == 3 and any(r["arm"] == "dpo" for r in kept)
    assert analysis.summarise(kept, 50)["scarce", arm.name]["metrics"]["exact_match"][0] == pytest.approx(1.0)
    # before λ=10 was run the grid selects nothing: no main run of the arm is current
    assert not [
        r
        for r in analysis.current(recs[:2] + recs[3:], run.ARMS, study)
        if r["arm"] == arm.name and r["kind"] == "main"
    ]
