"""Data problems are found before any model loads, all at once, named by config key, line and field."""

from __future__ import annotations

import json

import pytest

from preftune.config import load_config
from preftune.data import DataError, check_data, load_examples

from .conftest import write_jsonl


def _pairs(n: int) -> list[dict]:
    return [{"prompt": f"{i} plus {i}?", "chosen": f"{2 * i}", "rejected": f"{2 * i + 1}"} for i in range(n)]


def _cfg(**data):
    return load_config({"model": "unused", "data": data})


def test_a_missing_file_names_the_config_key_and_path(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", _pairs(3))
    missing = tmp_path / "held-out.jsonl"
    with pytest.raises(DataError) as error:
        check_data(_cfg(train=train, eval=str(missing)))
    assert "data.eval" in str(error.value) and str(missing) in str(error.value)
    assert "file not found" in str(error.value)


def test_every_missing_column_is_reported_with_the_override_that_maps_it(tmp_path):
    rows = [
        {"question": r["prompt"], "answer_good": r["chosen"], "answer_bad": r["rejected"]} for r in _pairs(3)
    ]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError) as error:
        check_data(_cfg(train=train))
    message = str(error.value)
    assert "missing columns 'prompt', 'chosen', 'rejected'" in message
    assert "data.columns.chosen=answer_good" in message and "data.columns.rejected=answer_bad" in message
    assert "data.columns.prompt=" in message
    assert "\n" not in message
    # and the override it suggests works
    cfg = load_config(
        {"model": "unused", "data": {"train": train}},
        [
            "data.columns.prompt=question",
            "data.columns.chosen=answer_good",
            "data.columns.rejected=answer_bad",
        ],
    )
    assert len(check_data(cfg).loaded["train"].examples) == 3


def test_the_first_ten_bad_rows_are_named_at_once(tmp_path):
    rows = _pairs(20)
    for i in range(2, 14):  # 12 bad rows, lines 3..14
        rows[i]["chosen"] = ""
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError) as error:
        check_data(_cfg(train=train))
    message = str(error.value)
    assert message.startswith(f"{train}, line 3, field 'chosen': empty completion")
    assert "12 bad rows in all" in message and "and 2 more" in message
    for line in range(4, 13):
        assert f"line {line}, field 'chosen': empty completion" in message
    assert "line 13," not in message and "\n" not in message
    assert (error.value.row, error.value.field) == (3, "chosen")


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_non_utf8_text_is_named_by_line(tmp_path, suffix):
    path = tmp_path / f"train.{suffix}"
    if suffix == "jsonl":
        lines = [json.dumps(r).encode() for r in _pairs(4)]
        lines[2] = lines[2].replace(b"plus", b"pl\xe9s")  # latin-1 e-acute
    else:
        lines = [b"prompt,chosen,rejected"] + [
            f"{r['prompt']},{r['chosen']},{r['rejected']}".encode() for r in _pairs(4)
        ]
    lines[2] = lines[2].replace(b"plus", b"pl\xe9s")
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError) as error:
        load_examples(str(path))
    assert str(error.value).startswith(f"{path}, line 3: not UTF-8 text: byte 0xe9 at column")


def test_a_broken_csv_quote_is_named_as_such(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text(
        'prompt,chosen,rejected\n1 plus 1?,2,3\n"2 plus 2?,4,5\n3 plus 3?,6,7\n4 plus 4?,8,9\n',
        encoding="utf-8",
    )
    with pytest.raises(DataError) as error:
        load_examples(str(path))
    assert (
        str(error.value)
        == f"{path}, line 3: broken CSV quoting: a quoted field opened on this line is never closed"
    )


def test_skipping_says_how_many_rows_and_which(tmp_path):
    rows = _pairs(8)
    rows[1]["rejected"] = None
    rows[5]["chosen"] = "  "
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    logged = []
    check = check_data(_cfg(train=train, on_error="skip"), log=logged.append)
    assert check.skipped == {"train": 2}
    (line,) = logged
    assert line.startswith(f"train: skipped 2 bad rows of {train} (data.on_error=skip): line 2")
    assert "line 6 ('chosen': empty completion)" in line
    assert check.report == {"train/rows": {"read": 8, "skipped": 2, "skipped_rows": [2, 6]}}
