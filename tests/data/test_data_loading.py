"""Loading and validating preference data from every supported source."""

from __future__ import annotations

import json
import pickle

import pytest

from preftune.data import Columns, DataError, Example, UnpairedExample, examples_fingerprint, load_examples

from .conftest import write_jsonl

PAIRS = [
    {"prompt": "What color is the sky?", "chosen": "It is blue.", "rejected": "It is green."},
    {"prompt": "Where is the sun?", "chosen": "In the sky.", "rejected": "In the sea."},
    {"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5"},
]
CHAT = [
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sky color?"}],
        "chosen": [{"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "assistant", "content": "Green."}],
    },
    {
        "prompt": [{"role": "user", "content": "Sun?", "name": "alice"}],  # an extra key in one message
        "chosen": [{"role": "assistant", "content": "In the sky."}],
        "rejected": [{"role": "assistant", "content": "In the sea."}],
    },
]


def write_source(tmp_path, kind, rows):
    """Write ``rows`` as ``kind``; return (source, expected row numbers)."""
    import datasets

    if kind == "jsonl":
        return write_jsonl(tmp_path / "d.jsonl", rows), list(range(1, len(rows) + 1))
    if kind == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(rows, indent=None).replace("}, {", "},\n{"), encoding="utf-8")
        return str(path), list(range(1, len(rows) + 1))
    dataset = datasets.Dataset.from_list(rows)
    if kind == "parquet":
        dataset.to_parquet(str(tmp_path / "d.parquet"))
        return str(tmp_path / "d.parquet"), list(range(len(rows)))
    if kind == "csv":
        dataset.to_csv(str(tmp_path / "d.csv"), index=False)
        return str(tmp_path / "d.csv"), list(range(2, len(rows) + 2))  # header is line 1
    if kind == "disk":
        datasets.DatasetDict({"train": dataset, "test": dataset.select([0])}).save_to_disk(
            str(tmp_path / "d")
        )
        return str(tmp_path / "d"), list(range(len(rows)))
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv", "disk"])
def test_every_source_round_trips_plain_pairs(tmp_path, kind):
    source, rows = write_source(tmp_path, kind, PAIRS)
    loaded = load_examples(source)
    expected = [Example(r["prompt"], r["chosen"], r["rejected"], row) for r, row in zip(PAIRS, rows)]
    assert loaded.examples == expected
    assert loaded.conversational is False and loaded.skipped == [] and loaded.source == source
    assert loaded.row_kind == ("index" if kind in ("parquet", "disk") else "line")


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "disk"])
def test_conversational_round_trips_and_fingerprints_agree(tmp_path, kind):
    reference = load_examples(write_jsonl(tmp_path / "ref.jsonl", CHAT))
    source, _ = write_source(tmp_path, kind, CHAT)
    loaded = load_examples(source)
    assert loaded.conversational is True
    # Arrow sources add None for absent struct keys; they must not leak into the messages.
    assert [(e.prompt, e.chosen, e.rejected) for e in loaded.examples] == [
        (r["prompt"], r["chosen"], r["rejected"]) for r in CHAT
    ]
    assert examples_fingerprint(loaded) == examples_fingerprint(reference)


def test_save_to_disk_picks_split_and_names_missing_split(tmp_path):
    source, _ = write_source(tmp_path, "disk", PAIRS)
    assert len(load_examples(source, split="test").examples) == 1
    with pytest.raises(DataError, match=r"no split 'validation'; available splits: test, train"):
        load_examples(source, split="validation")


def test_jsonl_line_numbers_count_blank_lines_and_max_rows(tmp_path):
    source = write_jsonl(tmp_path / "d.jsonl", PAIRS, blank_line_after_first=True)
    loaded = load_examples(source)
    assert [e.row for e in loaded.examples] == [1, 3, 4]
    assert [e.row for e in load_examples(source, max_rows=2).examples] == [1, 3]


def test_json_array_rows_are_numbered_by_the_line_they_start_on(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(PAIRS, indent=2), encoding="utf-8")
    loaded = load_examples(str(path))
    text_lines = path.read_text().splitlines()
    assert [text_lines[e.row - 1].strip() for e in loaded.examples] == ["{"] * 3
    assert loaded.examples[1].row == 7


def test_csv_multiline_quoted_field_keeps_true_line_numbers(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text(
        'prompt,chosen,rejected\n"line one\nline two",yes,no\nsecond,,no\n',
        encoding="utf-8",
    )
    with pytest.raises(DataError) as error:
        load_examples(str(path))
    assert str(error.value) == f"{path}, line 4, field 'chosen': missing value"
    assert (error.value.source, error.value.row, error.value.field) == (str(path), 4, "chosen")


def test_implicit_prompt_is_extracted_from_full_conversations(tmp_path):
    user = {"role": "user", "content": "Sky color?"}
    row = {
        "chosen": [user, {"role": "assistant", "content": "Blue."}],
        "rejected": [user, {"role": "assistant", "content": "Green."}],
    }
    multi = {
        "chosen": [
            user,
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Sure?"},
            {"role": "assistant", "content": "Yes."},
        ],
        "rejected": [
            user,
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Sure?"},
            {"role": "assistant", "content": "No."},
        ],
    }
    loaded = load_examples(write_jsonl(tmp_path / "d.jsonl", [row, multi]))
    first, second = loaded.examples
    assert first == Example([user], [row["chosen"][1]], [row["rejected"][1]], 1)
    assert second.prompt == multi["chosen"][:3]
    assert second.chosen == [{"role": "assistant", "content": "Yes."}]
    assert second.rejected == [{"role": "assistant", "content": "No."}]


def test_plain_prompt_next_to_full_conversations_is_extracted_like_trl(tmp_path):
    user = {"role": "user", "content": "Sky color?"}
    row = {
        "prompt": "Sky color?",
        "chosen": [user, {"role": "assistant", "content": "Blue."}],
        "rejected": [user, {"role": "assistant", "content": "Green."}],
    }
    (example,) = load_examples(write_jsonl(tmp_path / "d.jsonl", [row])).examples
    assert example.prompt == [user] and example.chosen == [{"role": "assistant", "content": "Blue."}]


def test_unpaired_labels_in_every_spelling(tmp_path):
    rows = [
        {"prompt": "a", "completion": "x", "label": True},
        {"prompt": "b", "completion": "y", "label": 0},
        {"prompt": "c", "completion": "z", "label": "true"},
        {"prompt": "d", "completion": "w", "label": "False"},
    ]
    loaded = load_examples(write_jsonl(tmp_path / "d.jsonl", rows), unpaired=True)
    assert loaded.examples == [
        UnpairedExample("a", "x", True, 1),
        UnpairedExample("b", "y", False, 2),
        UnpairedExample("c", "z", True, 3),
        UnpairedExample("d", "w", False, 4),
    ]
    assert loaded.unpaired
    csv_rows = [
        {"prompt": "a", "completion": "x", "label": 1},
        {"prompt": "b", "completion": "y", "label": 0},
    ]
    source, _ = write_source(tmp_path, "csv", csv_rows)
    assert [e.label for e in load_examples(source, unpaired=True).examples] == [True, False]


def test_custom_column_names(tmp_path):
    rows = [{"question": "q?", "good": "yes", "bad": "no"}]
    cols = Columns(prompt="question", chosen="good", rejected="bad")
    (example,) = load_examples(write_jsonl(tmp_path / "d.jsonl", rows), columns=cols).examples
    assert example == Example("q?", "yes", "no", 1)
    rows = [{"question": "q?", "good": "yes", "bad": ""}]
    with pytest.raises(DataError, match=r"line 1, field 'bad': empty completion"):
        load_examples(write_jsonl(tmp_path / "e.jsonl", rows), columns=cols)


# ------------------------------------------------------------------------------------------- bad input


def test_malformed_jsonl_line_names_its_line_and_skip_records_it(tmp_path):
    path = tmp_path / "train.jsonl"
    lines = [json.dumps(PAIRS[0]), json.dumps(PAIRS[1])[:-5], json.dumps(PAIRS[2])]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"^.*train\.jsonl, line 2: invalid JSON: ") as error:
        load_examples(str(path))
    assert error.value.row == 2 and error.value.field is None
    loaded = load_examples(str(path), on_error="skip")
    assert [e.row for e in loaded.examples] == [1, 3]
    assert len(loaded.skipped) == 1 and loaded.skipped[0][:2] == (2, None)
    assert loaded.skipped[0][2].startswith("invalid JSON")


def test_missing_column_names_file_columns_and_suggestion(tmp_path):
    rows = [{"prompt": "p", "chosen_response": "a", "rejected": "b"}]
    source = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError) as error:
        load_examples(source)
    message = str(error.value)
    assert message.startswith(f"{source}, field 'chosen': missing column 'chosen'")
    assert "columns found: 'prompt', 'chosen_response', 'rejected'" in message
    assert "Did you mean 'chosen_response'?" in message
    # on_error="skip" cannot skip a column that no row has.
    with pytest.raises(DataError, match="missing column 'chosen'"):
        load_examples(source, on_error="skip")


def test_missing_prompt_column_for_plain_text_is_an_error(tmp_path):
    source = write_jsonl(tmp_path / "d.jsonl", [{"promt": "p", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match=r"missing column 'prompt'.*Did you mean 'promt'\?"):
        load_examples(source)


def test_paired_vs_unpaired_hint(tmp_path):
    source = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    with pytest.raises(DataError, match="looks like paired data"):
        load_examples(source, unpaired=True)


@pytest.mark.parametrize(
    ("row", "field", "reason"),
    [
        ({"prompt": "p", "chosen": "  \n", "rejected": "b"}, "chosen", "empty completion"),
        ({"prompt": " ", "chosen": "a", "rejected": "b"}, "prompt", "empty prompt"),
        ({"prompt": "p", "chosen": "a", "rejected": None}, "rejected", "missing value"),
        ({"prompt": "p", "chosen": "a"}, "rejected", "missing value"),
        (
            {"prompt": "p", "chosen": 42, "rejected": "b"},
            "chosen",
            "expected a string or a list of messages, got int 42",
        ),
        (
            {
                "prompt": [{"content": "hi"}],
                "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}],
            },
            "prompt",
            "message 1 has no 'role'",
        ),
        (
            {
                "prompt": [{"role": "human", "content": "hi"}],
                "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}],
            },
            "prompt",
            "message 1 has role 'human'; expected one of system, user, assistant, tool",
        ),
        (
            {
                "prompt": [{"role": "user", "content": "hi"}],
                "chosen": [{"role": "assistant", "content": 3}],
                "rejected": [{"role": "assistant", "content": "b"}],
            },
            "chosen",
            "message 1 has content int 3; only text content is supported",
        ),
        (
            {
                "prompt": [{"role": "user", "content": "hi"}],
                "chosen": [{"role": "user", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}],
            },
            "chosen",
            "a completion must start with an assistant message, found role 'user'",
        ),
        (
            {
                "prompt": "hi",
                "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}],
            },
            "prompt",
            "mixes plain text ('prompt') with message lists ('chosen', 'rejected') in one row",
        ),
    ],
)
def test_bad_row_names_file_line_and_field(tmp_path, row, field, reason):
    source = write_jsonl(tmp_path / "train.jsonl", [PAIRS[0], row])
    with pytest.raises(DataError) as error:
        load_examples(source)
    assert str(error.value) == f"{source}, line 2, field '{field}': {reason}"
    assert (error.value.source, error.value.row, error.value.field) == (source, 2, field)
    loaded = load_examples(source, on_error="skip")
    assert [e.row for e in loaded.examples] == [1]
    assert loaded.skipped == [(2, field, reason)]


def test_bad_label(tmp_path):
    source = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c", "label": "maybe"}])
    with pytest.raises(DataError, match=r"line 1, field 'label': expected a boolean label"):
        load_examples(source, unpaired=True)


def test_mixed_conversational_and_plain_rows(tmp_path):
    source = write_jsonl(tmp_path / "d.jsonl", [CHAT[0], PAIRS[0], CHAT[1]])
    with pytest.raises(
        DataError,
        match=r"line 2, field 'chosen': row holds plain text but earlier rows hold "
        r"messages \(first at line 1\)",
    ):
        load_examples(source)
    loaded = load_examples(source, on_error="skip")
    assert [e.row for e in loaded.examples] == [1, 3] and loaded.conversational


def test_parquet_errors_use_zero_based_index(tmp_path):
    source, _ = write_source(tmp_path, "parquet", [PAIRS[0], {**PAIRS[1], "chosen": ""}])
    with pytest.raises(DataError, match=r"d\.parquet, index 1, field 'chosen': empty completion"):
        load_examples(source)


def test_identical_pairs_are_kept_and_counted(tmp_path):
    rows = [PAIRS[0], {"prompt": "p", "chosen": "same", "rejected": "same"}]
    loaded = load_examples(write_jsonl(tmp_path / "d.jsonl", rows))
    assert len(loaded.examples) == 2 and loaded.identical_pairs == [2]


def test_every_row_invalid_raises_even_when_skipping(tmp_path):
    source = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "chosen": "", "rejected": "b"}])
    with pytest.raises(DataError, match="every row was invalid"):
        load_examples(source, on_error="skip")


def test_missing_file_and_offline_hub_name(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        load_examples(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match=r"not a local file or folder.*HF_HUB_OFFLINE=1"):
        load_examples("some-org/some-dataset-that-is-not-cached")


def test_data_error_survives_pickling():
    error = DataError("empty completion", source="a.jsonl", row=3, field="chosen")
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == "a.jsonl, line 3, field 'chosen': empty completion"
    assert (copy.source, copy.row, copy.field) == ("a.jsonl", 3, "chosen")


# ----------------------------------------------------------------------------------------- fingerprint


def test_fingerprint_changes_with_any_field_and_not_otherwise(tmp_path):
    base = load_examples(write_jsonl(tmp_path / "a.jsonl", PAIRS))
    same = load_examples(write_jsonl(tmp_path / "b.jsonl", PAIRS, blank_line_after_first=True))
    assert examples_fingerprint(base) == examples_fingerprint(same)  # path and line numbers do not count
    seen = {examples_fingerprint(base)}
    for field in ("prompt", "chosen", "rejected"):
        rows = [dict(r) for r in PAIRS]
        rows[2][field] += "!"
        seen.add(examples_fingerprint(load_examples(write_jsonl(tmp_path / f"{field}.jsonl", rows))))
    seen.add(examples_fingerprint(load_examples(write_jsonl(tmp_path / "order.jsonl", PAIRS[::-1]))))
    assert len(seen) == 5
    chat = load_examples(write_jsonl(tmp_path / "c.jsonl", CHAT))
    reordered_keys = [
        {k: [{key: m[key] for key in reversed(m)} for m in v] for k, v in r.items()} for r in CHAT
    ]
    assert examples_fingerprint(chat) == examples_fingerprint(
        load_examples(write_jsonl(tmp_path / "d.jsonl", reordered_keys))
    )
    rows = json.loads(json.dumps(CHAT))
    rows[0]["prompt"][0]["role"] = "user"
    assert examples_fingerprint(
        load_examples(write_jsonl(tmp_path / "e.jsonl", rows))
    ) != examples_fingerprint(chat)
    unpaired = [{"prompt": "p", "completion": "c", "label": True}]
    flipped = [{"prompt": "p", "completion": "c", "label": False}]
    assert examples_fingerprint(
        load_examples(write_jsonl(tmp_path / "u.jsonl", unpaired), unpaired=True)
    ) != (examples_fingerprint(load_examples(write_jsonl(tmp_path / "v.jsonl", flipped), unpaired=True)))


def test_line_numbers_ignore_unicode_line_separators_inside_strings(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{**PAIRS[0], "prompt": "a\u2028b\x0cc"}, PAIRS[1]]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    loaded = load_examples(str(path))
    assert [e.row for e in loaded.examples] == [1, 2] and loaded.examples[0].prompt == "a\u2028b\x0cc"


def test_malformed_json_array_names_the_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(
        '[\n  {"prompt": "p", "chosen": "a", "rejected": "b"},\n  {"prompt": "p" "chosen": "a"}\n]\n'
    )
    with pytest.raises(DataError, match=r"d\.json, line 3: invalid JSON: Expecting ',' delimiter"):
        load_examples(str(path), on_error="skip")
