"""Loaded data is streamed, not held: a split costs a few numbers per row, not Python objects.

Issue 13, item 5: data preparation must not keep anything O(rows) as Python objects per process.
The memory checks count what ``tracemalloc`` sees (every Python object and numpy array; the
memory-mapped token stores are files, not heap) and what ``gc`` tracks, per row, with bounds far
above what streaming costs (tens of bytes per row) and far below what holding the rows costs (the
text itself, ~1 KB per row here, plus several objects per row).
"""

from __future__ import annotations

import gc
import hashlib
import json
import pickle
import random
import tracemalloc
from pathlib import Path

import pytest

from preftune.data import DataError, LoadedData, load_examples
from preftune.data.store import data_fingerprint

from .conftest import write_jsonl
from .test_data_loading import CHAT, PAIRS, write_source

ROWS = 20_000
WORDS = "the of and to in is that for it as was with be by on not this are or from at which".split()


def _write_rows(path: Path, n: int, words: int, seed: int = 0) -> str:
    rng = random.Random(seed)

    def text(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    with open(path, "w") as handle:
        for _ in range(n):
            row = {"prompt": text(words), "chosen": text(words), "rejected": text(words)}
            handle.write(json.dumps(row) + "\n")
    return str(path)


def _measure(call):
    """(result, bytes still allocated after, peak bytes during, gc-tracked objects added) of ``call()``."""
    gc.collect()
    objects = len(gc.get_objects())
    tracemalloc.start()
    try:
        result = call()
        gc.collect()
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, current, peak, len(gc.get_objects()) - objects


def test_loading_keeps_a_few_bytes_per_row_not_the_rows(tmp_path):
    # ~1.1 KB of text per row: holding the rows would cost >= that per row; streaming costs ~30 B
    source = _write_rows(tmp_path / "big.jsonl", ROWS, words=60)
    loaded, current, peak, objects = _measure(lambda: load_examples(source))
    assert len(loaded) == ROWS
    assert current / ROWS < 100, f"{current / ROWS:.0f} bytes per row kept after loading"
    assert peak / ROWS < 200, f"{peak / ROWS:.0f} bytes per row at the peak of loading"
    assert objects < ROWS / 20, f"{objects} Python objects added for {ROWS} rows"
    # the rows are still all there, read again on demand, and iterating holds one chunk at a time
    last = loaded.examples[-1]
    assert last.row == ROWS and last.prompt == json.loads(Path(source).read_text().splitlines()[-1])["prompt"]
    _, _, peak, _ = _measure(lambda: sum(len(e.prompt) for e in loaded.examples))
    assert peak / ROWS < 200, f"{peak / ROWS:.0f} bytes per row at the peak of iterating"


def test_a_prepared_split_keeps_no_python_objects_per_row(tmp_path):
    """prepare_data, cold (building the token store) and warm (mapping it): no per-row objects kept,
    and the peak stays below what the loaded rows alone would cost."""
    from preftune.config import load_config
    from preftune.data.prepare import prepare_data
    from preftune.testing import tiny_tokenizer

    def config(source: str, cache: str):
        return load_config(
            {
                "model": str(tmp_path / "policy"),
                "data": {"train": source, "num_proc": 1},
                "method": "dpo",
                "max_length": 64,
                "cache_dir": str(tmp_path / cache),
                "progress": False,
            }
        )

    tokenizer = tiny_tokenizer()
    # a first, small run pays the one-time costs (lazy imports: jinja2, tqdm; tokenizer caches)
    small = config(_write_rows(tmp_path / "small.jsonl", 50, words=6, seed=1), "small-cache")
    prepare_data(small, tokenizer, tmp_path / "policy", unpaired=False, log=lambda m: None)
    cfg = config(_write_rows(tmp_path / "rows.jsonl", ROWS, words=6), "cache")  # short rows: fast to tokenize
    for mode in ("cold", "warm"):
        data, current, peak, objects = _measure(
            lambda: prepare_data(cfg, tokenizer, tmp_path / "policy", unpaired=False, log=lambda m: None)
        )
        store = data.views[0].tokenized["train"]
        assert len(store) == ROWS
        assert current / ROWS < 100, f"{mode}: {current / ROWS:.0f} bytes per row kept after"
        assert peak / ROWS < 400, f"{mode}: {peak / ROWS:.0f} bytes per row at the peak"
        assert objects < ROWS / 20, f"{mode}: {objects} Python objects added for {ROWS} rows"
        assert store[ROWS - 1].row == ROWS
    assert len(list((tmp_path / "cache" / "tokens").iterdir())) == 1  # warm mapped the cold store


def _old_store_digest(loaded: LoadedData) -> str:
    """The store key's data digest as it was computed over lists before streaming (kept here to
    show streaming did not change any cache key)."""
    h = hashlib.sha256()
    head = [loaded.unpaired, loaded.conversational, loaded.row_kind, repr(loaded.columns)]
    h.update(json.dumps(head, default=str).encode())
    for e in list(loaded.examples):
        item = (
            [e.row, e.prompt, e.completion, e.label]
            if loaded.unpaired
            else [e.row, e.prompt, e.chosen, e.rejected]
        )
        data = json.dumps(item, sort_keys=True, ensure_ascii=False, default=str).encode()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv", "disk"])
@pytest.mark.parametrize("rows", ["plain", "chat"])
def test_streamed_examples_read_back_what_was_validated(tmp_path, kind, rows):
    from preftune.data.loading import StreamedExamples

    if rows == "chat" and kind == "csv":
        pytest.skip("CSV holds no message lists")
    data = [*PAIRS, {**PAIRS[0], "chosen": ""}, PAIRS[1]] if rows == "plain" else [*CHAT, CHAT[0]]
    source, numbers = write_source(tmp_path, kind, data)
    loaded = load_examples(source, on_error="skip")
    examples = loaded.examples
    assert isinstance(examples, StreamedExamples) and not isinstance(examples, list)
    held = list(examples)
    if not (rows == "chat" and kind == "json"):  # write_source numbers flat JSON array rows only
        kept = [n for k, n in enumerate(numbers) if not (rows == "plain" and k == 3)]
        assert [e.row for e in held] == kept
    assert examples == held and examples[-1] == held[-1] and examples[1:3] == held[1:3]
    assert pickle.loads(pickle.dumps(examples)) == held  # worker processes read their own rows
    # the digest computed while streaming is the one computed over the rows, as before streaming
    assert loaded.digest == _old_store_digest(loaded)
    as_list = LoadedData(
        examples=held,
        source=loaded.source,
        conversational=loaded.conversational,
        columns=loaded.columns,
        row_kind=loaded.row_kind,
    )
    assert data_fingerprint(as_list) == data_fingerprint(loaded) == loaded.digest


def test_single_object_json_and_unpaired_rows_stream_too(tmp_path):
    path = tmp_path / "one.json"
    path.write_text("\ufeff\n" + json.dumps(PAIRS[0], indent=2) + "\n", encoding="utf-8")
    loaded = load_examples(str(path))
    assert [(e.row, e.prompt) for e in loaded.examples] == [(2, PAIRS[0]["prompt"])]
    rows = [
        {"prompt": "p", "completion": "c", "label": True},
        {"prompt": "q", "completion": "d", "label": "no"},
    ]
    unpaired = load_examples(write_jsonl(tmp_path / "u.jsonl", rows), unpaired=True)
    assert [e.label for e in unpaired.examples] == [True, False]
    assert unpaired.digest == _old_store_digest(unpaired)


def test_a_file_changed_after_loading_is_an_error_not_other_rows(tmp_path):
    source = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    loaded = load_examples(source)
    write_jsonl(tmp_path / "d.jsonl", [{**row, "prompt": "changed " + row["prompt"]} for row in PAIRS])
    with pytest.raises(DataError, match=r"d\.jsonl: the file changed after it was loaded"):
        list(loaded.examples)


def test_a_prompt_column_first_met_in_a_later_row_validates_every_row_against_it(tmp_path):
    """The implicit-prompt rule depends on the columns of the whole file; streaming decides it at
    the first row, then validates again when a later row brings a prompt column."""
    no_prompt = {
        "chosen": CHAT[0]["prompt"] + CHAT[0]["chosen"],
        "rejected": CHAT[0]["prompt"] + CHAT[0]["rejected"],
    }
    source = write_jsonl(tmp_path / "d.jsonl", [no_prompt, CHAT[1]])
    loaded = load_examples(source, on_error="skip")
    assert loaded.skipped == [(1, "prompt", "missing value")]
    assert [e.row for e in loaded.examples] == [2] and loaded.examples[0].prompt == CHAT[1]["prompt"]
    with pytest.raises(DataError, match=r"d\.jsonl, line 1, field 'prompt': missing value"):
        load_examples(source)
    # without any prompt column the same first row is a full conversation: its prompt is extracted
    alone = load_examples(write_jsonl(tmp_path / "e.jsonl", [no_prompt]))
    assert alone.examples[0].prompt == CHAT[0]["prompt"]


def test_bad_rows_are_counted_all_and_reported_first_ten(tmp_path):
    rows = [{**PAIRS[0], "chosen": ""} if k % 2 else PAIRS[0] for k in range(30)]
    source = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(
        DataError, match=r"line 2, field 'chosen': empty completion \[15 bad rows in all;.*and 5 more"
    ):
        load_examples(source)
    skipped = load_examples(source, on_error="skip").skipped
    assert [row for row, _, _ in skipped] == list(range(2, 31, 2))
