"""The command line end to end on a tiny model: precompute, train, eval, report."""

import json

import pytest
import yaml

from preftune.cli import main
from preftune.config import load_config
from preftune.trainer import Trainer

from .conftest import metric_rows


@pytest.fixture
def config_file(base_config, tmp_path):
    def make(**overrides):
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(base_config(**overrides)))
        return path

    return make


def test_precompute_train_eval_report(config_file, tmp_path, capsys):
    cfg = config_file(method="mallows_theta", max_steps=3)
    assert main(["precompute", str(cfg)]) == 0
    cached = set((tmp_path / "cache" / "references").glob("*.safetensors"))
    assert len(cached) == 2
    capsys.readouterr()
    assert main(["train", str(cfg), "beta=0.2"]) == 0
    printed = capsys.readouterr().out
    # train ends with its held-out results (n, meanings), where the files are and the disk used
    assert "Held-out results after training (n = " in printed
    assert "eval_initial/rewards/accuracies" in printed and "ties count 1/2" in printed
    assert "disk used by the run directory:" in printed and "metrics.jsonl" in printed
    assert set((tmp_path / "cache" / "references").glob("*.safetensors")) == cached  # reused
    run = tmp_path / "run"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["beta"] == 0.2 and saved["method"] == "mallows_theta"
    state = json.loads((run / "run_state.json").read_text())
    # phi* is calibrated so that the mean dispersion c(x) over the training set is 1
    check = Trainer(load_config(run / "config.yaml", [f"output_dir={tmp_path / 'check'}"]))
    assert check.run.phi_star == state["phi_star"]
    assert float(check.run.inputs.dispersion_c["train"].mean()) == pytest.approx(1.0, abs=1e-4)

    capsys.readouterr()
    assert main(["eval", str(cfg)]) == 0  # a config names its run directory
    out = capsys.readouterr()
    (saved,) = run.glob("eval-*.json")
    metrics = json.loads(saved.read_text())["metrics"]
    # the printout: every metric with its n and meaning, the file it was saved to
    assert f"(n = {metrics['eval_n']} held-out pairs)" in out.out and str(saved) in out.out
    assert "eval_logps/accuracies" in out.out and "no reference" in out.out
    # the held-out data is the eval split, under its name: "reference 0 (...) eval: cached ..."
    assert ") eval: cached scores reused" in out.out + out.err
    assert ") train: cached scores reused" not in out.out + out.err
    assert main(["eval", str(cfg)]) == 0  # a second call keeps the first result
    assert len(list(run.glob("eval-*.json"))) == 2
    last_eval = metric_rows(run, "eval_loss")[-1]
    # eval re-scores the final model against the cached initial policy: same numbers as training's eval
    assert metrics["eval_initial/rewards/accuracies"] == pytest.approx(
        last_eval["eval_initial/rewards/accuracies"]
    )
    assert metrics["eval_loss"] == pytest.approx(last_eval["eval_loss"], abs=1e-4)

    assert main(["report", str(run)]) == 0
    assert (run / "loss.png").is_file()
    report = (run / "report.md").read_text()
    # report shows what eval wrote (eval.json), not only what training logged
    held_out = report.split("## Held-out evaluation", 1)[1]
    assert "`eval_initial/rewards/accuracies`" in held_out and "`eval_loss`" in held_out
    assert saved.name in held_out and "n (held-out pairs)" in held_out


def test_unknown_command_and_help(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err
    assert main([]) == 0
    assert "preftune <command>" in capsys.readouterr().out


def test_misspelled_command_gets_a_suggestion(capsys):
    assert main(["trian"]) == 2
    assert "Did you mean `preftune train`?" in capsys.readouterr().err
    assert main(["reprot"]) == 2
    assert "preftune report" in capsys.readouterr().err


def test_version(capsys):
    from preftune import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"preftune {__version__}"


@pytest.mark.parametrize(
    "command", ["train", "precompute", "eval", "demo", "report", "config", "presets", "cache"]
)
def test_every_command_has_real_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: preftune {command}")
    assert "``" not in out and ":func:" not in out  # no RST markup
    # every option is described: no option line without a help text after it
    lines = [*out.splitlines(), ""]
    for i, line in enumerate(lines):
        if line.startswith("  -") and not line.startswith("  -h"):
            described = len([p for p in line.split("  ") if p.strip()]) >= 2
            assert described or lines[i + 1].startswith("        "), line
    if command == "config":
        assert "mrpo.clip_eps" not in out  # help, not the config


def test_train_without_config_says_what_is_missing(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "usage: preftune train CONFIG.yaml [KEY=VALUE ...]" in err
    assert "config file is required" in err and "overrides" not in err


def test_presets_lists_converted_state_size_and_place(tmp_path, capsys):
    from preftune.models.presets import MANIFEST_NAME, PRESETS

    name = next(iter(PRESETS))
    where = tmp_path / "models" / name
    where.mkdir(parents=True)
    (where / MANIFEST_NAME).write_text("{}")
    (where / "model.safetensors").write_bytes(b"0" * 2_000_000)
    assert main(["presets", "--cache-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(line for line in lines if line.startswith(name))
    assert " yes " in row and "2.0 MB" in row and str(where) in row
    others = [line for line in lines if line.split(" ")[0] in PRESETS and not line.startswith(name)]
    assert others and all(" no " in line for line in others)


def test_cache_ls_and_clear(tmp_path, capsys):
    (tmp_path / "references").mkdir()
    (tmp_path / "references" / "a.safetensors").write_bytes(b"0" * 3000)
    (tmp_path / "embeddings").mkdir()
    (tmp_path / "embeddings" / "b.safetensors").write_bytes(b"0" * 1000)
    assert main(["cache", "--cache-dir", str(tmp_path), "ls"]) == 0
    out = capsys.readouterr().out
    assert "references" in out and "3.0 KB" in out and "total" in out and "4.0 KB" in out
    assert main(["cache", "--cache-dir", str(tmp_path), "clear", "references"]) == 0
    assert not (tmp_path / "references").exists() and (tmp_path / "embeddings").exists()
    assert "freed 3.0 KB" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["cache", "--cache-dir", str(tmp_path), "clear", "referencez"])
    assert exit_.value.code == 2
    assert main(["cache", "--cache-dir", str(tmp_path), "clear"]) == 0
    assert list(tmp_path.iterdir()) == []


def test_cache_ls_counts_entries_not_their_files_and_knows_every_kind(tmp_path, capsys):
    refs = tmp_path / "references"
    refs.mkdir()
    for key in ("k1", "k2"):  # one entry: its scores and its metadata
        (refs / f"{key}.safetensors").write_bytes(b"0" * 10)
        (refs / f"{key}.json").write_text("{}")
    (refs / "k1.safetensors.lock").write_text("")  # a writer's lock: not an entry
    (tmp_path / "tokens" / "store-a").mkdir(parents=True)
    (tmp_path / "tokens" / "store-a" / "prompt.tokens").write_bytes(b"0" * 8)
    (tmp_path / "tokens" / "store-b.lock").write_text("")
    assert main(["cache", "--cache-dir", str(tmp_path), "ls"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert "2 entries" in rows["references"] and "1 entry " in rows["tokens"], rows
    assert "tokenized" in rows["tokens"]  # a documented kind, with its meaning
    assert main(["cache", "--cache-dir", str(tmp_path), "clear", "tokens"]) == 0
    assert not (tmp_path / "tokens").exists() and refs.exists()


def test_third_party_deprecation_warnings_are_quiet(monkeypatch):
    import sys
    import warnings

    from preftune.cli import _quiet_third_party_warnings

    monkeypatch.setattr(sys, "warnoptions", [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _quiet_third_party_warnings()
        warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning, stacklevel=1)
        warnings.warn("something of ours", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something of ours"]


def test_config_command_lists_every_key(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "mrpo.clip_eps" in out and "rpo.contrast_scope" in out and "mallows.phi_star" in out
