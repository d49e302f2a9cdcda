"""The memory-mapped token store returns exactly what the lists of ``tokenize_dataset`` held."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from preftune.cache import hash_token_lists
from preftune.data import load_examples, tokenize_dataset
from preftune.data.records import DataError
from preftune.data.store import TokenStore, build_token_store, store_key
from preftune.references import ModelView

WORDS = "the a cat sat on mat 12 + 30 = 42 answer is why because ünïcödé ✓ question , . !".split()


def _text(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _write(tmp_path, n: int, seed: int, unpaired: bool = False, chat: bool = False, long_every: int = 0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = _text(rng, 1, 15 if not long_every or i % long_every else 120)
        if unpaired:
            row = {"prompt": prompt, "completion": _text(rng, 1, 20), "label": rng.random() < 0.5}
        else:
            row = {"prompt": prompt, "chosen": _text(rng, 1, 25), "rejected": _text(rng, 1, 25)}
        if chat:
            row = {
                k: [{"role": "user" if k == "prompt" else "assistant", "content": v}]
                if isinstance(v, str)
                else v
                for k, v in row.items()
            }
        rows.append(row)
    path = tmp_path / f"rows-{seed}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_examples(str(path), unpaired=unpaired)


@pytest.mark.parametrize(
    ("unpaired", "chat", "max_length"), [(False, False, 64), (False, True, None), (True, False, 80)]
)
def test_store_equals_lists_on_random_rows(tmp_path, tiny_tokenizer, unpaired, chat, max_length):
    loaded = _write(tmp_path, 150, seed=3, unpaired=unpaired, chat=chat)
    lists, report = tokenize_dataset(loaded, tiny_tokenizer, max_length=max_length, progress=False)
    store = build_token_store(
        loaded, tiny_tokenizer, tmp_path / "store", max_length=max_length, batch_size=32, progress=False
    )
    assert len(store) == len(lists) == 150
    assert store.report == report
    assert [store[i] for i in range(len(store))] == lists  # every field: ids, row, truncated, text, label
    assert list(store.prompt_texts) == [it.prompt_text for it in lists]
    sides = ("completion",) if unpaired else ("chosen", "rejected")
    old, new = ModelView("m", tmp_path, tiny_tokenizer), ModelView("m", tmp_path, tiny_tokenizer)
    old.tokenized["train"], new.tokenized["train"] = lists, store
    assert new.token_key("train", sides) == old.token_key("train", sides)
    rng = random.Random(0)
    for _ in range(20):  # random batches, repeated and unordered indices included
        index = [rng.randrange(len(lists)) for _ in range(rng.randint(0, 12))]
        for side in sides:
            assert new.sequences("train", side, index) == old.sequences("train", side, index)
        if unpaired:
            assert new.labels("train", index) == old.labels("train", index)
    # a selection (rows kept for every model) hashes and reads like the sub-list
    keep = sorted(rng.sample(range(len(lists)), 60))
    sub = store.select(keep)
    assert [sub[i] for i in range(len(sub))] == [lists[i] for i in keep]
    assert sub.token_key(["prompt", *sides]) == hash_token_lists(
        [lists[i].prompt_ids for i in keep],
        *([getattr(lists[i], f"{s}_ids") for i in keep] for s in sides),
    )
    assert list(sub.prompt_texts) == [lists[i].prompt_text for i in keep]


def test_num_proc_2_writes_the_same_store_as_num_proc_1(tmp_path, tiny_tokenizer):
    loaded = _write(tmp_path, 300, seed=5, long_every=7)
    kwargs = dict(max_length=96, on_error="skip", batch_size=16, progress=False)
    one = build_token_store(loaded, tiny_tokenizer, tmp_path / "one", num_proc=1, **kwargs)
    two = build_token_store(loaded, tiny_tokenizer, tmp_path / "two", num_proc=2, **kwargs)
    assert one.report.skipped, "the long prompts must be skipped for this test to mean something"
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "two").iterdir())
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    lists, report = tokenize_dataset(loaded, tiny_tokenizer, max_length=96, on_error="skip", progress=False)
    assert two.report == report and [two[i] for i in range(len(two))] == lists


def test_errors_name_the_same_row_as_tokenize_dataset(tmp_path, tiny_tokenizer):
    loaded = _write(tmp_path, 100, seed=7, long_every=9)
    with pytest.raises(DataError) as want:
        tokenize_dataset(loaded, tiny_tokenizer, max_length=96, progress=False)
    for num_proc in (1, 2):
        with pytest.raises(DataError) as got:
            build_token_store(
                loaded, tiny_tokenizer, tmp_path / f"s{num_proc}", max_length=96, num_proc=num_proc,
                batch_size=8, progress=False,
            )  # fmt: skip
        assert str(got.value) == str(want.value)
        assert not (tmp_path / f"s{num_proc}").exists()  # nothing half-written left behind
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_an_existing_store_is_mapped_not_rebuilt(tmp_path, tiny_tokenizer, monkeypatch):
    from preftune.data import store as store_module

    loaded = _write(tmp_path, 40, seed=9)
    key = store_key(loaded, tiny_tokenizer, max_length=64, on_error="raise", chat_template=None)
    first = build_token_store(loaded, tiny_tokenizer, tmp_path / key, max_length=64, progress=False)

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("an existing store must be reused")

    monkeypatch.setattr(store_module, "tokenize_batch", no_tokenizing)
    again = build_token_store(loaded, tiny_tokenizer, tmp_path / key, max_length=64, progress=False)
    assert [again[i] for i in range(len(again))] == [first[i] for i in range(len(first))]
    assert isinstance(again._tokens["chosen"], np.memmap)  # mapped from the files, not read into lists
    # the key follows the data, the tokenizer and the settings
    other = _write(tmp_path, 40, seed=10)
    assert store_key(other, tiny_tokenizer, max_length=64, on_error="raise", chat_template=None) != key
    assert store_key(loaded, tiny_tokenizer, max_length=65, on_error="raise", chat_template=None) != key
    from preftune.testing import tiny_tokenizer as make_tokenizer

    assert (
        store_key(loaded, make_tokenizer(vocab_size=300), max_length=64, on_error="raise", chat_template=None)
        != key
    )
    assert isinstance(TokenStore(tmp_path / key), TokenStore)


class _ExamplesThatKillTheirWorker(list):
    """Examples whose reading ends the process that reads them, as an out-of-memory kill would, but
    only in a tokenizer worker."""

    def __getitem__(self, i):
        import multiprocessing
        import os

        if multiprocessing.parent_process() is not None:
            os._exit(9)
        return super().__getitem__(i)


def test_a_worker_that_dies_raises_instead_of_hanging(tmp_path, tiny_tokenizer):
    """With the pool's own timeout as the backstop: a dead worker's batch never arrives, and the
    parent must say so, not wait for it; nothing half-written is left behind."""
    loaded = _write(tmp_path, 40, seed=11)
    loaded.examples = _ExamplesThatKillTheirWorker(loaded.examples)
    with pytest.raises(RuntimeError, match="tokenizer worker process died.*data.num_proc: 1"):
        build_token_store(
            loaded, tiny_tokenizer, tmp_path / "store", max_length=64, num_proc=2, batch_size=8,
            progress=False,
        )  # fmt: skip
    assert not (tmp_path / "store").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_workers_do_not_fork_the_calling_process():
    """A fork copies the caller's threads' locks as they are; the workers start from a fresh
    interpreter (a fork server) instead."""
    from preftune.data.store import _worker_context

    assert _worker_context().get_start_method() in ("forkserver", "spawn")


def test_a_script_without_a_main_guard_is_told_so_instead_of_hanging(tmp_path):
    """Workers start from a fresh interpreter that imports the main module: a script that tokenizes
    with num_proc > 1 at its top level would run again in it. It gets an error naming the guard."""
    import subprocess
    import sys

    loaded = _write(tmp_path, 60, seed=12)
    script = tmp_path / "unguarded.py"
    script.write_text(
        "from preftune.data import load_examples\n"
        "from preftune.data.store import build_token_store\n"
        "from preftune.testing import tiny_tokenizer\n"
        f"loaded = load_examples({str(loaded.source)!r})\n"
        f"build_token_store(loaded, tiny_tokenizer(), {str(tmp_path / 'store')!r}, max_length=64, num_proc=2,"
        " batch_size=8, progress=False)\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert 'if __name__ == "__main__":' in proc.stderr and "data.num_proc: 1" in proc.stderr
