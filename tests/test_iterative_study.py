"""experiments/iterative: the study's runner at toy size (--quick, tiny random model): sweep on
validation first, main runs on the test rows, results written as they land, finished runs skipped."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parents[1] / "experiments" / "iterative"


def _load():
    spec = importlib.util.spec_from_file_location("iterative_study_run", HERE / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_quick_study_runs_resumes_and_reports(tmp_path):
    run = _load()
    out = run.run_study(quick=True, out=tmp_path / "study", arms=["rs_sft"])
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    study = run.QUICK
    sweep = [r for r in records if r["kind"] == "sweep"]
    main = [r for r in records if r["kind"] == "main"]
    assert len(sweep) == len(study.nll_grid) * len(study.temperature_grid)
    assert all(r["split"] == "validation" for r in sweep)  # selection never sees the test rows
    assert [(r["arm"], r["seed"], r["split"]) for r in main] == [("rs_sft", s, "test") for s in study.seeds]
    splits = json.loads((out / "data" / "splits.json").read_text())
    assert not set(splits["test"]) & set(splits["validation"])
    assert not set(splits["validation"]) & set(splits["prompts"])
    for r in records:  # round 0 = untrained; the sweep runs stop after sweep_rounds
        rounds = study.sweep_rounds if r["kind"] == "sweep" else study.rounds
        assert sorted(r["exact_match"]) == [str(i) for i in range(rounds + 1)]
        assert r["seconds"] > 0 and r["machine"]["cpus"] and r["finished"]
        assert r["machine"]["torch_threads"] == 1  # --quick's one thread, not preftune's automatic count
    # the untrained answers are the same for every run of a split
    assert len({json.dumps(r["exact_match"]["0"]) for r in sweep}) == 1
    text = (out / "RESULTS.md").read_text()
    assert "| `rs_sft` |" in text and "Chosen: λ" in text and "wall time" in text
    assert (out / "curves.png").is_file()
    # a rerun finds everything finished: nothing is redone
    run.run_study(quick=True, out=out, arms=["rs_sft"])
    assert len((out / "results.jsonl").read_text().splitlines()) == len(records)


def test_the_demo_check_runs_every_round_on_validation_after_the_main_runs(tmp_path):
    run = _load()
    out = run.run_study(quick=True, out=tmp_path / "study", arms=[run.DEMO_CHECK_ARM])
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in records]
    assert kinds[-1] == "demo_check" and kinds.count("demo_check") == 1 and "main" in kinds
    check = records[-1]
    assert check["arm"] == run.DEMO_CHECK_ARM and check["split"] == "validation"
    # all rounds (the sweep runs stop after sweep_rounds), at the setting the sweep chose
    assert sorted(check["exact_match"]) == [str(i) for i in range(run.QUICK.rounds + 1)]
    chosen = run.selected(records, run.QUICK)
    assert (check["sft_weight"], check["temperature"]) == chosen
    assert "## Demo check (validation only)" in (out / "RESULTS.md").read_text()


def test_the_demo_check_is_read_against_the_demo_arms_validation_answers():
    run = _load()
    rows = list(range(1436, 1500))  # the method comparison's validation problems, in its order
    demo = run.demo_arm_validation(rows)
    if demo is None:
        pytest.skip("experiments/method_comparison/results is not in this checkout")
    assert len(demo) == 64 and sum(demo) / 64 == pytest.approx(0.390625)  # the README's 0.391
    study = run.FULL

    def check(final):
        record = {"kind": "demo_check", "arm": "dpo_nll", "seed": 0, "sft_weight": 1.0, "temperature": 0.3}
        record["split_rows"] = rows
        record["exact_match"] = {str(r): [0.0] * 64 for r in range(study.rounds)} | {str(study.rounds): final}
        return "\n".join(run.demo_check_lines([record], study))

    better = check([1.0] * 64)
    assert "0.391" in better and "+0.609" in better and "holds (CI above 0)" in better
    assert "should gain a way to show it" in better
    worse = check(list(demo[:32]) + [0.0] * 32)  # the demo's answers on half the problems, none on the rest
    assert "does not score higher" in worse and "demo keeps its arm" in worse
