"""One row far longer than max_length: truncated like any other, without holding its tokens.

The bounded encoder tokenizes only a prefix of such a text (grown until it gives more than
max_length tokens), so the first max_length tokens are those of the whole text, and peak memory with
one 20 MB row stays within 1.5x of the same data without it (before: 4.1 GB against 0.47 GB)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from preftune.data import tokenize as T

TEXTS = [
    "word " * 5000,
    "x" * 30000,  # one pre-token
    "é😀 " * 4000,  # multi-byte characters
    "a" + " " * 20000 + "b c d",  # a whitespace run: a few long tokens, the prefix must grow
    "short",
]


@pytest.mark.parametrize("max_length", [4, 16, 64])
def test_the_first_max_length_tokens_are_those_of_the_whole_text(max_length, monkeypatch):
    from preftune.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    monkeypatch.setattr(T, "_MIN_CHARS", 8)
    monkeypatch.setattr(T, "_CHARS_PER_TOKEN", 2)
    bounded = T._encode_bounded(tokenizer, TEXTS, True, max_length)
    whole = T._encode(tokenizer, TEXTS, True)
    for b, w, text in zip(bounded, whole, TEXTS):
        assert b[: max_length + 1] == w[: max_length + 1], text[:20]
        assert len(b) > max_length or b == w


def _peak_rss_mb(tmp_path, model_dir, data) -> float:
    script = textwrap.dedent(
        f"""
        import resource
        from preftune.trainer import train
        train({{"model": {str(model_dir)!r}, "data": {{"train": {str(data)!r}}}, "batch_size": 4,
                "max_steps": 1, "max_length": 128, "output_dir": {str(tmp_path / data.stem)!r},
                "cache_dir": {str(tmp_path / "cache")!r}, "progress": False, "report_to": []}})
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return float(done.stdout.strip().splitlines()[-1])


def test_a_20_mb_row_costs_at_most_half_again_the_peak_memory(tiny_model_dir, tmp_path):
    rows = [
        {
            "prompt": [{"role": "user", "content": f"What is {a} plus {a + 1}?"}],
            "chosen": [{"role": "assistant", "content": f"The answer is {2 * a + 1}."}],
            "rejected": [{"role": "assistant", "content": f"The answer is {2 * a + 3}."}],
        }
        for a in range(32)
    ]
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps(r) + "\n" for r in rows))
    huge = dict(rows[5], chosen=[{"role": "assistant", "content": "word " * 4_000_000}])  # 20 MB
    big = tmp_path / "big.jsonl"
    big.write_text("".join(json.dumps(r) + "\n" for r in rows[:5] + [huge] + rows[5:]))
    assert big.stat().st_size > 20_000_000
    without, with_huge = (
        _peak_rss_mb(tmp_path, tiny_model_dir, small),
        _peak_rss_mb(tmp_path, tiny_model_dir, big),
    )
    print(f"peak RSS: {without:.0f} MB without the 20 MB row, {with_huge:.0f} MB with it")
    assert with_huge <= 1.5 * without, (without, with_huge)
