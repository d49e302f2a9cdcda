import json
import math

import numpy as np
import pytest
from matplotlib.image import imread

from preftune import report
from preftune.report import legend_labels, load_run, main, make_figures, plot_runs, write_report

N_STEPS = 120


def train_line(step, *, loss=None, margin=None, speed=1.0, **extra):
    loss = 0.69 * math.exp(-speed * step / 60) + 0.05 * math.sin(step) + 0.1 if loss is None else loss
    margin = speed * 0.02 * step + 0.1 * math.cos(step) if margin is None else margin
    return {
        "step": step,
        "epoch": step / N_STEPS,
        "loss": loss,
        "rewards/chosen": margin / 2,
        "rewards/rejected": -margin / 2,
        "rewards/margins": margin,
        "rewards/accuracies": min(1.0, 0.5 + step / 300 + 0.05 * math.sin(3 * step)),
        "logps/chosen": -50.0 + step / 10,
        "logps/rejected": -55.0 - step / 10,
        "learning_rate": 5e-7,
        "grad_norm": 1.5,
        "tokens_per_second": 12345.6,
        "peak_memory_mb": 2048.0,
        **extra,
    }


def eval_line(step, loss):
    return {
        "step": step,
        "epoch": step / N_STEPS,
        "eval_loss": loss,
        "eval_rewards/margins": step / 40,
        "eval_rewards/accuracies": 0.5 + step / 400,
    }


def make_run(
    root, name, *, method="mrpo", beta=0.1, evaluation=True, final_loss=0.1234, exact_match=0.25, speed=1.0
):
    run_dir = root / name
    run_dir.mkdir()
    lines = [train_line(step, speed=speed, **{"mrpo/alpha_0": 0.5}) for step in range(1, 81)]
    lines.append(eval_line(40, 0.55))
    lines.append(eval_line(80, 0.9999))  # logged again after the resume below
    # Resumed from the step-60 checkpoint: steps 61..80 are logged again and must win.
    lines += [train_line(step, speed=speed, **{"mrpo/alpha_0": 0.6}) for step in range(61, N_STEPS)]
    lines.append(eval_line(80, 0.45))
    lines.append(train_line(N_STEPS, loss=final_loss, margin=2.5, **{"mrpo/alpha_0": 0.7}))
    lines.append(eval_line(N_STEPS, 0.4321))
    text = "\n".join(json.dumps(line) for line in lines) + "\n"
    text += '{"step": 121, "epoch": 1.01, "loss": 0.0'  # crash mid-write
    (run_dir / "metrics.jsonl").write_text(text)
    (run_dir / "config.yaml").write_text(
        f"method: {method}\nmodel: HuggingFaceTB/SmolLM2-135M-Instruct\nbeta: {beta}\nlearning_rate: 5.0e-7\n"
    )
    if evaluation:
        (run_dir / "evaluation.json").write_text(
            json.dumps(
                {
                    "before": {
                        "preference_accuracy": 0.5125,
                        "reward_margin": 0.0,
                        "exact_match": exact_match,
                        "n": 80,
                    },
                    "after": {
                        "preference_accuracy": 0.8375,
                        "reward_margin": 1.75,
                        "exact_match": None if exact_match is None else exact_match + 0.125,
                        "n": 80,
                    },
                }
            )
        )
    return run_dir


def assert_valid_png(path):
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].var() > 1e-3, f"{path.name} looks blank"
    assert image.shape[:2] == (500, 800)  # 8x5 in at 100 dpi


def test_load_run_last_line_wins_and_truncated_line_ignored(tmp_path):
    run = load_run(make_run(tmp_path, "run"))
    steps = [row["step"] for row in run.train]
    assert steps == list(range(1, N_STEPS + 1))  # one row per step, sorted, partial step 121 dropped
    by_step = {row["step"]: row for row in run.train}
    assert by_step[60]["mrpo/alpha_0"] == 0.5  # before the resume point: first attempt
    assert by_step[70]["mrpo/alpha_0"] == 0.6  # re-logged after the resume: last wins
    assert [row["step"] for row in run.eval] == [40, 80, N_STEPS]
    assert {row["step"]: row["eval_loss"] for row in run.eval}[80] == 0.45
    assert run.label == "mrpo β=0.1"
    assert run.config["beta"] == 0.1
    assert run.evaluation["after"]["preference_accuracy"] == 0.8375
    assert run.last_step == N_STEPS
    assert run.final("loss") == 0.1234 and run.final("eval_loss") == 0.4321


def test_load_run_tolerates_bad_lines_and_nested_config(tmp_path, caplog):
    run_dir = tmp_path / "nested"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 0.7}\nnot json\n[1, 2]\n{"loss": 0.1}\n\n{"step": 2.0, "loss": NaN}\n'
    )
    (run_dir / "config.yaml").write_text(
        "method:\n  name: dpo\nloss:\n  beta: 0.25\nmodel:\n  name_or_path: tiny\n"
    )
    run = load_run(run_dir)
    assert [row["step"] for row in run.train] == [1, 2]
    assert run.label == "dpo β=0.25"
    assert "not valid JSON" in caplog.text  # a bad line in the middle is reported, not fatal
    assert run.evaluation is None
    text = write_report(run_dir).read_text()
    assert "| model | tiny |" in text and "| `loss` | nan | — |" in text


def test_write_report_single_run(tmp_path):
    run_dir = make_run(tmp_path, "run")
    path = write_report(run_dir, extra_sections={"Notes": "Demo on SmolLM2."})
    assert path == run_dir / "report.md"
    for name in ("loss.png", "margins.png", "accuracy.png", "before_after.png"):
        assert_valid_png(run_dir / name)
        assert f"]({name})" in path.read_text()
    text = path.read_text()
    assert "# Training report: mrpo β=0.1" in text
    assert "| method | mrpo |" in text and "| beta | 0.1 |" in text and "| steps | 120 |" in text
    assert "SmolLM2-135M-Instruct" in text
    # Final train/eval metrics, including the method extras.
    assert "| `loss` | 0.1234 | 0.4321 |" in text
    assert "| `rewards/margins` | 2.5 | 3 |" in text
    assert "| `mrpo/alpha_0` | 0.7 | — |" in text
    assert "| median tokens/s | 12346 |" in text
    # Before/after table.
    assert "| preference accuracy | 0.5125 | 0.8375 | +0.325 |" in text
    assert "| exact match | 0.25 | 0.375 | +0.125 |" in text
    assert "| examples (n) | 80 | 80 |" in text
    assert text.rstrip().endswith("## Notes\n\nDemo on SmolLM2.")


def test_single_run_figures_and_no_evaluation(tmp_path):
    run = load_run(make_run(tmp_path, "run", evaluation=False))
    figures = make_figures([run])
    assert set(figures) == {"loss.png", "margins.png", "accuracy.png"}
    labels = legend_labels(figures["loss.png"])
    assert labels == ["mrpo β=0.1", "train (smoothed)", "train (each step)", "eval (held-out)"]
    text = write_report(run.path).read_text()
    assert "Before vs after" not in text and not (run.path / "before_after.png").exists()


def test_report_shows_what_preftune_eval_wrote(tmp_path, caplog):
    from preftune.rundir import RunDir

    run_dir = make_run(tmp_path, "run", evaluation=False)
    assert "Held-out evaluation" not in write_report(run_dir, plots=False).read_text()
    # the file `preftune eval` writes (its name comes from the one run-directory schema)
    RunDir(run_dir).eval_metrics.write_text(json.dumps({"eval_loss": 0.3456, "eval_exact_match": 0.75}))
    text = write_report(run_dir, plots=False).read_text()
    section = text.split("## Held-out evaluation", 1)[1]
    assert "| `eval_loss` | 0.3456 |" in section and "| `eval_exact_match` | 0.75 |" in section
    other = make_run(tmp_path, "other", evaluation=False)
    runs = report._load_runs([run_dir, other], None)
    comparison = report.write_comparison(runs, tmp_path / "compare").read_text()
    assert "Held-out evaluation" in comparison and "0.3456" in comparison

    RunDir(run_dir).eval_metrics.write_text("{not json")
    assert "Held-out evaluation" not in write_report(run_dir, plots=False).read_text()
    assert "eval.json is not valid JSON" in caplog.text


def test_comparison_of_two_runs(tmp_path):
    run_a = make_run(tmp_path, "a", method="dpo", beta=0.1, exact_match=None)
    run_b = make_run(tmp_path, "b", method="mrpo", beta=0.05, speed=1.5)
    runs = [load_run(run_a), load_run(run_b)]
    figures = make_figures(runs)
    for name in ("loss.png", "margins.png", "accuracy.png"):
        labels = legend_labels(figures[name])
        assert "dpo β=0.1" in labels and "mrpo β=0.05" in labels
    # Exact match missing for one run still gets a panel (for the other).
    assert len(figures["before_after.png"].axes) == 2

    out = tmp_path / "compare"
    paths = plot_runs([run_a, run_b], out, labels=["baseline", "multi-ref"])
    assert sorted(p.name for p in paths) == ["accuracy.png", "before_after.png", "loss.png", "margins.png"]
    for path in paths:
        assert_valid_png(path)


def test_duplicate_labels_are_disambiguated(tmp_path):
    runs = report._load_runs([make_run(tmp_path, "seed0"), make_run(tmp_path, "seed1")], None)
    assert [run.label for run in runs] == ["mrpo β=0.1 (seed0)", "mrpo β=0.1 (seed1)"]


def test_cli_single_and_compare(tmp_path, monkeypatch, capsys):
    run_a = make_run(tmp_path, "a", method="dpo")
    run_b = make_run(tmp_path, "b", evaluation=False)
    assert main([str(run_a), "--label", "my run"]) == 0
    printed = capsys.readouterr().out.split("\n\n")[0].split()  # the files, before the summary
    assert str(run_a / "report.md") in printed and str(run_a / "loss.png") in printed
    assert "# Training report: my run" in (run_a / "report.md").read_text()

    monkeypatch.chdir(tmp_path)
    assert main([str(run_a), str(run_b)]) == 0
    printed = capsys.readouterr().out.split("\n\n")[0].split()  # the files, before the summary
    compare = tmp_path / "report-compare"
    assert {p.split("/")[-1] for p in printed} == {
        "loss.png",
        "margins.png",
        "accuracy.png",
        "before_after.png",
        "report.md",
    }
    text = (compare / "report.md").read_text()
    assert "| dpo β=0.1 |" in text and "| mrpo β=0.1 |" in text and "0.8375" in text


def test_missing_metrics_gives_clear_error(tmp_path, capsys):
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="not_a_run.*metrics.jsonl"):
        load_run(empty)
    assert main([str(empty)]) == 2
    assert "not_a_run" in capsys.readouterr().err
    assert main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "does not exist" in err


def test_label_count_must_match(tmp_path):
    run_a, run_b = make_run(tmp_path, "a"), make_run(tmp_path, "b")
    with pytest.raises(SystemExit):
        main([str(run_a), str(run_b), "--label", "only one"])


def test_ema_is_debiased_and_tracks_constant():
    assert report.ema([2.0, 2.0, 2.0], 0.1) == pytest.approx([2.0, 2.0, 2.0])
    smoothed = np.array(report.ema(list(np.sin(np.arange(300))), 2 / 11))
    assert smoothed.std() < 0.5 * np.sin(np.arange(300)).std()


def make_short_run(root, name, *, steps=6, eval_every=2, method="dpo"):
    """A short run as the trainer now logs it: an evaluation at step 0 (before training) and every
    ``eval_every`` steps, with ``eval_n``."""
    run_dir = root / name
    run_dir.mkdir()
    lines = []
    for step in range(0, steps + 1):
        if step:
            lines.append(train_line(step, speed=3.0))
        if step % eval_every == 0 or step == steps:
            lines.append(
                {
                    "step": step,
                    "epoch": step / steps,
                    "eval_loss": 0.69 - 0.05 * step,
                    "eval_rewards/accuracies": 0.5 + 0.05 * step,
                    "eval_primary/rewards/accuracies": 0.5 + 0.05 * step,
                    "eval_primary/rewards/margins": 0.1 * step,
                    "eval_logps/accuracies": 0.6 + 0.02 * step,
                    "eval_n": 8,
                }
            )
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (run_dir / "config.yaml").write_text(f"method: {method}\nmodel: tiny\nbeta: 0.1\n")
    return run_dir


def _line_data(fig, label):
    (ax,) = fig.axes
    return [line for line in ax.get_lines() if line.get_label() == label]


def test_plots_carry_the_eval_series_smoothed_train_and_human_labels(tmp_path):
    run = load_run(make_short_run(tmp_path, "short"))
    figures = make_figures([run])
    for name, key in (("loss.png", "eval_loss"), ("accuracy.png", "eval_rewards/accuracies")):
        fig = figures[name]
        (eval_line,) = _line_data(fig, "eval (held-out)")
        steps, values = eval_line.get_data()
        assert list(steps) == [0, 2, 4, 6]  # the evaluation before training is the first point
        assert list(values) == pytest.approx([row[key] for row in run.eval])
        # a smoothed train line over faint raw points
        (smoothed,) = _line_data(fig, "train (smoothed)")
        assert len(smoothed.get_xdata()) == 6
        raw = [line for line in fig.axes[0].get_lines() if line.get_linestyle() == "None"]
        assert raw and raw[0].get_alpha() < 0.5
        ax = fig.axes[0]
        assert "/" not in ax.get_ylabel() and ax.get_xlabel() == "step"  # no raw metric keys
    assert figures["accuracy.png"].axes[0].get_ylabel() == "preference accuracy (fraction of pairs)"


def test_short_runs_get_integer_step_ticks(tmp_path):
    run = load_run(make_short_run(tmp_path, "three", steps=3, eval_every=1))
    ax = make_figures([run])["loss.png"].axes[0]
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)  # no 0.5 or 1.25 steps


def test_before_after_panel_for_every_run_from_its_evaluations(tmp_path):
    run_dir = make_short_run(tmp_path, "short")
    run = load_run(run_dir)
    assert report.before_after(run)["before"]["preference_accuracy"] == 0.5
    assert report.before_after(run)["after"]["preference_accuracy"] == pytest.approx(0.8)
    fig = make_figures([run])["before_after.png"]
    lengths = sorted(round(p.get_width(), 4) for ax in fig.axes for p in ax.patches)  # horizontal bars
    assert 0.5 in lengths and 0.8 in lengths and 0.6 in lengths and 0.72 in lengths
    text = write_report(run_dir).read_text()
    section = text.split("## Before vs after training", 1)[1].split("##", 1)[0]
    assert "| preference accuracy | 0.5 | 0.8 |" in section
    assert_valid_png(run_dir / "before_after.png")


def test_comparison_page_has_a_summary_table_with_before_and_after(tmp_path, capsys):
    a = make_short_run(tmp_path, "a", method="dpo")
    b = make_short_run(tmp_path, "b", method="mrpo", steps=4)
    assert main([str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    # the console ends with the comparison: each run's held-out numbers before → after
    summary = printed.split("held-out results, before → after training:", 1)[1]
    rows = [line for line in summary.splitlines() if line.startswith(("dpo", "mrpo"))]
    assert len(rows) == 2 and "0.5 → 0.8" in rows[0] and "0.5 → 0.7" in rows[1]
    assert printed.rstrip().endswith(str(tmp_path / "cmp" / "report.md"))
    text = (tmp_path / "cmp" / "report.md").read_text()
    assert "| run | method |" in text and "| dpo β=0.1 |" in text and "| mrpo β=0.1 |" in text
    assert "pref. acc. before" in text and "likelihood acc. after" in text
    for name in ("loss.png", "accuracy.png", "before_after.png"):
        assert_valid_png(tmp_path / "cmp" / name)


def test_report_lists_every_eval_call_with_n(tmp_path):
    from preftune.rundir import RunDir

    run_dir = make_short_run(tmp_path, "short")
    rd = RunDir(run_dir)
    first = rd.new_eval_result("held-out")
    first.write_text(
        json.dumps({"data": "held-out.jsonl", "n": 8, "metrics": {"eval_loss": 0.5, "eval_n": 8}})
    )
    second = rd.new_eval_result("held-out")
    assert second != first  # a second call in the same second gets its own file
    second.write_text(
        json.dumps({"data": "other.jsonl", "n": 4, "metrics": {"eval_loss": 0.25, "eval_n": 4}})
    )
    text = write_report(run_dir, plots=False).read_text()
    section = text.split("## Held-out evaluation", 1)[1]
    assert first.name in section and second.name in section
    assert "| n (held-out pairs) | 8 | 4 |" in section and "| `eval_loss` | 0.5 | 0.25 |" in section


def make_sft_run(root, name, *, steps=8, sft_weight=3.0, evals=(0, 8)):
    """A DPO + λ·SFT run as the trainer logs it: the loss and its two terms, loss/sigmoid and nll_loss."""
    run_dir = root / name
    run_dir.mkdir()
    lines = [{"step": s, "eval_loss": 3.2 - 0.2 * s, "eval_n": 8} for s in evals]
    for step in range(1, steps + 1):
        preference, nll = 0.69 - 0.02 * step, 1.0 - 0.1 * step
        lines.append(
            train_line(
                step, loss=preference + sft_weight * nll, **{"loss/sigmoid": preference, "nll_loss": nll}
            )
        )
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (run_dir / "config.yaml").write_text(f"method: dpo\nmodel: tiny\nbeta: 0.1\nsft_weight: {sft_weight}\n")
    return run_dir


def test_a_loss_of_two_terms_is_titled_by_both_and_plots_them_apart(tmp_path):
    run = load_run(make_sft_run(tmp_path, "sft"))
    fig = make_figures([run])["loss.png"]
    total_ax, terms_ax = fig.axes
    assert run.label == "dpo β=0.1 + 3·NLL"  # not the label of the same run without the NLL term
    assert total_ax.get_title() == "Loss = sigmoid + 3·NLL — dpo β=0.1 + 3·NLL"
    assert legend_labels(fig)[-2:] == ["sigmoid", "3·NLL"]
    # each term as it enters the loss: raw points of the weighted term, and the two add up to the loss
    raw = {
        round(float(line.get_ydata()[0]), 6)
        for line in terms_ax.get_lines()
        if line.get_linestyle() == "None"
    }
    assert raw == {round(0.69 - 0.02, 6), round(3.0 * 0.9, 6)}
    assert sum(raw) == pytest.approx(run.train[0]["loss"])
    # a one-term run (λ = 0: nll_loss is not a term) keeps one panel and the plain title
    plain = load_run(make_sft_run(tmp_path, "plain", sft_weight=0.0))
    (ax,) = make_figures([plain])["loss.png"].axes
    assert ax.get_title() == "Loss — dpo β=0.1" and plain.label == "dpo β=0.1"
    plot_runs([run.path], tmp_path / "png")
    assert_valid_png(tmp_path / "png" / "loss.png")


def test_two_evaluations_are_markers_not_a_trend_line(tmp_path):
    two = load_run(make_sft_run(tmp_path, "two", evals=(0, 8)))
    (points,) = [
        line
        for line in make_figures([two])["loss.png"].axes[0].get_lines()
        if line.get_label() == "eval (held-out)"
    ]
    assert len(points.get_xdata()) == 2 and points.get_linestyle() == "None" and points.get_marker() == "o"
    three = load_run(make_sft_run(tmp_path, "three", evals=(0, 4, 8)))
    (joined,) = [
        line
        for line in make_figures([three])["loss.png"].axes[0].get_lines()
        if line.get_label() == "eval (held-out)"
    ]
    assert joined.get_linestyle() == ":"
    # a two-step train series is markers too
    short = load_run(make_short_run(tmp_path, "short", steps=2, eval_every=1))
    train = [
        line for line in make_figures([short])["loss.png"].axes[0].get_lines() if len(line.get_xdata()) == 2
    ]
    assert train and all(line.get_linestyle() == "None" for line in train)
