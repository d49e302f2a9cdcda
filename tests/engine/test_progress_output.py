"""What a run prints: no library bars with ``progress: false``, no carriage returns in a log file,
and one line for each per-example input a method computes (RPO's embeddings, MallowsPO's c(x))."""

import re

from preftune import progress
from preftune.trainer import train


def test_progress_false_silences_the_libraries_loading_and_saving_bars(
    base_config, tiny_model_dir, monkeypatch, capfd
):
    monkeypatch.setattr(progress, "interactive", lambda stream=None: True)  # as on a terminal
    from transformers import AutoModelForCausalLM

    with progress.library_bars(True):  # the control: on a terminal with progress on, the bar is drawn
        AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert "Loading weights" in capfd.readouterr().err
    train(base_config(progress=False))
    captured = capfd.readouterr()
    assert "Loading weights" not in captured.err and "Writing model shards" not in captured.err
    assert "\r" not in captured.err + captured.out


def test_progress_into_a_file_is_plain_lines(base_config, capfd):
    train(base_config(progress=True))  # pytest's stderr is not a terminal
    captured = capfd.readouterr()
    assert "\r" not in captured.err + captured.out
    assert "Loading weights" not in captured.err  # transformers' bar redraws in place: off
    assert re.search(r"^train dpo: 2/2 step \(100%\), .* left, loss=\d\.\d{4}$", captured.err, flags=re.M)


def test_rpo_embeddings_and_mallows_dispersion_each_say_one_line(base_config, capsys):
    train(base_config(method="rpo"))
    out = capsys.readouterr().out
    assert re.search(
        r"RPO prompt embeddings \(train\): 32 prompts, all-MiniLM-L6-v2, dimension 384: embedded in [\d.]+ s",
        out,
    )
    assert "RPO prompt embeddings (eval): 8 prompts" in out
    train(base_config(method="rpo", output_dir=base_config()["output_dir"] + "-again"))  # the same cache
    assert "RPO prompt embeddings (train): 32 prompts, all-MiniLM-L6-v2: cached embeddings reused" in (
        capsys.readouterr().out
    )
    train(base_config(method="mallows_theta", output_dir=base_config()["output_dir"] + "-mallows"))
    (line,) = [line for line in capsys.readouterr().out.splitlines() if "MallowsPO dispersion" in line]
    assert "token entropies of 32 train, 8 eval pairs" in line and re.search(r"in [\d.]+ s$", line)
