"""The bundled arithmetic preference data: correctness, determinism, splits and sync with the generator."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from preftune.data import arithmetic
from preftune.data.arithmetic import (
    DEFAULT_SEED,
    ERROR_TYPES,
    KIND_WEIGHTS,
    MAX_TRAIN_REPEATS,
    RANGES,
    TEST_SIZE,
    TRAIN_SIZE,
    add_without_carry,
    arithmetic_path,
    digit_slip,
    evaluate,
    extract_answer,
    generate_records,
    generate_splits,
    is_correct,
    load_arithmetic,
    mul_without_carry,
    problem_key,
    sub_without_borrow,
    to_jsonl,
)

REPO = Path(__file__).resolve().parents[1]
STEP = re.compile(r"(\d+) ([+\-×]) (\d+) = (-?\d+)\.")
SYMBOL_TO_OP = {"+": "+", "-": "-", "×": "*"}


@pytest.fixture(scope="module")
def bundled():
    return {split: load_arithmetic(split) for split in ("train", "test")}


def _steps(text):
    return [(int(a), SYMBOL_TO_OP[op], int(b), int(c)) for a, op, b, c in STEP.findall(text)]


def test_generator_is_deterministic():
    assert generate_records(60, seed=7) == generate_records(60, seed=7)
    assert generate_records(60, seed=7) != generate_records(60, seed=8)
    small = generate_splits(3, n_train=80, n_test=20)
    assert small == generate_splits(3, n_train=80, n_test=20)
    # the test split does not depend on the size of the training split
    assert small["test"] == generate_splits(3, n_train=40, n_test=20)["test"]


def test_committed_files_match_a_fresh_generation():
    fresh = generate_splits(DEFAULT_SEED)
    for split in ("train", "test"):
        committed = arithmetic_path(split).read_text(encoding="utf-8")
        assert committed == to_jsonl(fresh[split]), f"run: python scripts/make_arithmetic_data.py ({split})"


def test_script_check_mode_agrees(tmp_path):
    script = REPO / "scripts" / "make_arithmetic_data.py"
    args = ["--train", "30", "--test", "10", "--out", str(tmp_path)]
    assert subprocess.run([sys.executable, script, *args], capture_output=True).returncode == 0
    assert subprocess.run([sys.executable, script, *args, "--check"], capture_output=True).returncode == 0
    (tmp_path / "test.jsonl").write_text("{}\n")
    assert subprocess.run([sys.executable, script, *args, "--check"], capture_output=True).returncode == 1


def test_sizes_and_fields(bundled):
    assert len(bundled["train"]) == TRAIN_SIZE and len(bundled["test"]) == TEST_SIZE
    total = sum(arithmetic_path(split).stat().st_size for split in ("train", "test"))
    assert total < 1_000_000
    ids = [r["id"] for split in bundled.values() for r in split]
    assert len(set(ids)) == len(ids)
    for records in bundled.values():
        for r in records:
            assert [m["role"] for m in r["prompt"]] == ["user"]
            assert [m["role"] for m in r["chosen"]] == [m["role"] for m in r["rejected"]] == ["assistant"]
            assert r["kind"] in KIND_WEIGHTS and r["error"] in ERROR_TYPES
            assert r["chosen"][0]["content"].endswith(f"The answer is {r['answer']}.")
            assert r["rejected"][0]["content"].endswith(f"The answer is {r['rejected_answer']}.")


def test_every_chosen_is_right_and_every_rejected_is_wrong(bundled):
    for records in bundled.values():
        for r in records:
            answer = evaluate(r["operands"], r["ops"])
            assert r["answer"] == answer
            chosen, rejected = r["chosen"][0]["content"], r["rejected"][0]["content"]
            assert is_correct(chosen, answer), r["id"]
            assert not is_correct(rejected, answer), r["id"]
            assert extract_answer(rejected) == r["rejected_answer"] >= 0
            # the chosen working: every step is true arithmetic and they chain to the answer
            steps = _steps(chosen)
            assert [(a, op, b) for a, op, b, _ in steps] == [
                (evaluate(r["operands"][: i + 1], r["ops"][:i]), op, r["operands"][i + 1])
                for i, op in enumerate(r["ops"])
            ]
            assert all(evaluate([a, b], [op]) == c for a, op, b, c in steps)
            # the rejected working holds exactly one kind of mistake
            bad = _steps(rejected)
            if r["error"] == "dropped_step":
                assert len(r["ops"]) == 2 and bad == steps[:1]
            elif r["error"] == "wrong_operation":
                assert [op for _, op, _, _ in bad] != r["ops"]
                assert all(evaluate([a, b], [op]) == c for a, op, b, c in bad)
            else:  # carry / digit slip: same operations, one result is off
                assert [op for _, op, _, _ in bad] == r["ops"]
                assert sum(evaluate([a, b], [op]) != c for a, op, b, c in bad) == 1


def test_operands_appear_in_the_question(bundled):
    for r in bundled["test"] + bundled["train"][:300]:
        numbers = [int(n) for n in re.findall(r"\d+", r["prompt"][0]["content"])]
        assert sorted(numbers) == sorted(r["operands"]), r["id"]


def test_splits_share_no_prompt_and_no_problem(bundled):
    prompts = {split: [r["prompt"][0]["content"] for r in records] for split, records in bundled.items()}
    keys = {split: Counter(problem_key(r) for r in records) for split, records in bundled.items()}
    assert not set(prompts["train"]) & set(prompts["test"])
    assert not set(keys["train"]) & set(keys["test"])
    assert len(set(prompts["train"])) == TRAIN_SIZE and len(set(prompts["test"])) == TEST_SIZE
    assert len(keys["test"]) == TEST_SIZE  # every test problem is different
    assert max(keys["train"].values()) <= MAX_TRAIN_REPEATS


def test_running_out_of_problems_is_an_error(monkeypatch):
    monkeypatch.setattr(arithmetic, "KIND_WEIGHTS", {"add": 1.0})
    monkeypatch.setattr(arithmetic, "RANGES", {"add": {"easy": ((1, 2), (1, 1))}})
    monkeypatch.setattr(arithmetic, "LEVEL_WEIGHTS", (1.0,))
    assert len(generate_records(2, seed=0)) == 2
    with pytest.raises(ValueError, match="ran out of different add/easy problems"):
        generate_records(3, seed=0)


def test_mix_of_kinds_levels_and_errors(bundled):
    for records in bundled.values():
        assert {r["error"] for r in records} == set(ERROR_TYPES)
        kinds = Counter(r["kind"] for r in records)
        for kind, weight in KIND_WEIGHTS.items():  # the mix follows the weights (3 sigma)
            expected = weight * len(records)
            assert abs(kinds[kind] - expected) < 3 * (expected * (1 - weight)) ** 0.5 + 1, kind
        for r in records:
            if r["kind"] == "two_step":
                assert r["level"] == "two_step" and len(r["ops"]) == 2
            else:
                (a_low, a_high), (b_low, b_high) = RANGES[r["kind"]][r["level"]]
                a, b = r["operands"]
                assert a_low <= a <= a_high and b_low <= b <= b_high


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12 + 7 = 19. The answer is 19.", 19),
        ("The answer is 19", 19),
        ("the ANSWER IS: 19!", 19),
        ("So the answer is **42**.", 42),
        ("The answer is $1,250.", 1250),
        ("The answer is -3.", -3),
        ("The answer is 5. Wait, no. The answer is 6.", 6),
        ("The answer is 2.5.", None),
        ("The answer is 1,25.", None),
        ("19", None),
        ("The answer is nineteen.", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_is_correct():
    assert is_correct("7 × 8 = 56. The answer is 56.", 56)
    assert not is_correct("7 × 8 = 56. The answer is 54.", 56)
    assert not is_correct("56", 56)


def test_student_mistakes():
    assert add_without_carry(27, 18) == 35
    assert add_without_carry(95, 17) == 2
    assert add_without_carry(12, 34) == 46
    assert sub_without_borrow(52, 18) == 46
    assert sub_without_borrow(305, 27) == 322
    assert mul_without_carry(24, 7) == 148
    assert mul_without_carry(7, 24) == 148
    assert mul_without_carry(6, 8) == 48
    rng = random.Random(0)
    for value in (1, 9, 10, 45, 100, 808):
        for _ in range(20):
            slipped = digit_slip(value, rng)
            assert slipped != value and slipped >= 0 and len(str(slipped)) == len(str(value))


def test_arithmetic_path():
    assert arithmetic_path("train").name == "train.jsonl" and arithmetic_path("train").is_file()
    with pytest.raises(ValueError, match="unknown split"):
        arithmetic_path("validation")
    json.loads(arithmetic_path("test").read_text().splitlines()[0])


def test_loadable_as_preference_data():
    from preftune.data import load_examples

    loaded = load_examples(str(arithmetic_path("test")))
    assert len(loaded.examples) == TEST_SIZE
