"""``preftune report`` comparing many runs: plots that stay readable with 8 runs, held-out numbers
with their yardsticks, and each run shown with the evaluation of its own final model."""

import itertools
import json

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from preftune.report import load_runs, make_figures
from preftune.report.plots import run_styles

METHODS = ("dpo", "ipo", "mrpo", "simpo", "kto", "orpo", "mallows_phi", "rpo")


def make_run(root, name, *, method="dpo", accuracy=0.8, references=None):
    """A finished 4-step run as the trainer logs it: eval rows at 0, 2, 4 with both yardsticks."""
    run_dir = root / name
    run_dir.mkdir()
    lines = []
    for step in range(5):
        if step:
            lines.append({"step": step, "loss": 0.69 - 0.1 * step, "rewards/accuracies": accuracy})
        if step % 2 == 0:
            lines.append(
                {
                    "step": step,
                    "eval_loss": 0.70 - 0.05 * step,
                    "eval_rewards/accuracies": 0.5 + 0.05 * step,
                    "eval_initial/rewards/accuracies": 0.5 + (accuracy - 0.5) * step / 4,
                    "eval_initial/rewards/margins": 0.1 * step,
                    "eval_logps/accuracies": 0.6,
                    "eval_n": 8,
                }
            )
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    config = f"method: {method}\nmodel: tiny\nbeta: 0.1\n"
    if references:
        config += "references:\n" + "".join(f"  - {r}\n" for r in references)
    (run_dir / "config.yaml").write_text(config)
    (run_dir / "final").mkdir()
    return run_dir


def _drawn_texts(fig):
    """(text, window bbox) of every text the figure draws: titles, value labels, tick labels inside
    the view, legend entries."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    texts = [t for t in (fig._suptitle,) if t is not None]
    for ax in fig.axes:
        texts += [ax.title, *ax.texts]
        for axis, (low, high) in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            low, high = min(low, high), max(low, high)
            texts += [t.label1 for t in axis.get_major_ticks() if low <= t.get_loc() <= high]
        if ax.get_legend() is not None:
            texts += ax.get_legend().get_texts()
    for legend in fig.legends:
        texts += legend.get_texts()
    found = []
    for text in texts:
        if text.get_visible() and text.get_text().strip():
            found.append((text.get_text(), text.get_window_extent(renderer)))
    return found


def _overlaps(a, b) -> bool:
    """Whether two bboxes share more than a pixel each way (touching edges do not count)."""
    return min(a.x1, b.x1) - max(a.x0, b.x0) > 1 and min(a.y1, b.y1) - max(a.y0, b.y0) > 1


@pytest.fixture
def eight_runs(tmp_path):
    # runs 0-3 log identical curves (the case that hid lines under one another)
    dirs = [
        make_run(tmp_path, f"run-{i}-{method}", method=method, accuracy=0.75 if i < 4 else 0.2 + 0.1 * i)
        for i, method in enumerate(METHODS)
    ]
    return load_runs(dirs, None)


def test_eight_runs_plot_without_overlapping_labels_and_with_distinct_lines(eight_runs):
    figures = make_figures(eight_runs)
    assert set(figures) == {"loss.png", "accuracy.png", "before_after.png"}
    for name, fig in figures.items():
        texts = _drawn_texts(fig)
        labels = [t for t, _ in texts]
        for run in eight_runs:  # every run is named in every figure
            assert any(run.label in label.replace("\n", " ") for label in labels), (name, run.label)
        for (ta, a), (tb, b) in itertools.combinations(texts, 2):
            assert not _overlaps(a, b), f"{name}: {ta!r} overlaps {tb!r}"

    # 8 distinct looks: colour, dash pattern and marker each differ between any two runs
    styles = run_styles(8)
    for key in ("color", "linestyle", "marker"):
        assert len({str(s[key]) for s in styles}) == 8, key
    (ax,) = figures["accuracy.png"].axes
    train = [line for line in ax.get_lines() if line.get_label() == "train (smoothed)"]
    assert len(train) == 8
    # the four identical curves are drawn one over another, each narrower than the one under it
    identical = [line for line in train if list(line.get_ydata()) == pytest.approx([0.75] * 4)]
    assert len(identical) == 4
    widths = [line.get_linewidth() for line in identical]
    assert widths == sorted(widths, reverse=True) and len(set(widths)) == 4
    looks = {(str(line.get_color()), line.get_marker(), str(line._unscaled_dash_pattern)) for line in train}
    assert len(looks) == 8  # every run's line has its own look
    # the eval points, identical for all 8 runs here, are concentric hollow markers of 8 sizes
    evals = [line for line in ax.get_lines() if line.get_label() == "eval (held-out)"]
    assert len({line.get_markersize() for line in evals}) == 8
    assert all(line.get_markerfacecolor() == "none" for line in evals)
