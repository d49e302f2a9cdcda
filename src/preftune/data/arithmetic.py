"""Grade-school arithmetic preference pairs, generated deterministically and bundled with preftune.

Each record is a short word problem in chat format with a correct worked answer (chosen) and a
plausible wrong one (rejected). Every answer ends with "The answer is N.", so a generation is
scored by exact match with :func:`is_correct`. The bundled files are made by
``scripts/make_arithmetic_data.py``; see docs/data.md.

    from preftune.data.arithmetic import arithmetic_path, is_correct
    train_file = arithmetic_path("train")    # JSONL, loadable by preftune.data.load_examples
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from importlib import resources
from pathlib import Path

DEFAULT_SEED = 20240917
TRAIN_SIZE = 1500
TEST_SIZE = 200
SPLITS = ("train", "test")

# How often each kind of problem is drawn.
KIND_WEIGHTS = {"add": 0.35, "sub": 0.30, "mul": 0.20, "two_step": 0.15}
# Operand ranges (inclusive) of the one-step kinds: (first, second). Small on purpose: a 135M
# model should be right sometimes (see docs/data.md for how this was calibrated).
RANGES = {
    "add": {"easy": ((2, 19), (2, 9)), "medium": ((20, 60), (2, 9)), "hard": ((10, 60), (10, 40))},
    "sub": {"easy": ((3, 19), (2, 9)), "medium": ((20, 70), (2, 9)), "hard": ((20, 90), (10, 50))},
    "mul": {"easy": ((2, 10), (2, 10)), "medium": ((2, 9), (11, 20)), "hard": ((2, 9), (21, 40))},
}
LEVEL_WEIGHTS = (0.5, 0.35, 0.15)  # easy, medium, hard
TWO_STEP_OPS = (("+", "-"), ("-", "+"), ("+", "+"), ("*", "+"), ("*", "-"))
# Ranges of a, b, c in (a op1 b) op2 c, by the first operation.
TWO_STEP_RANGES = {
    "+": ((5, 20), (2, 9), (2, 9)),
    "-": ((5, 20), (2, 9), (2, 9)),
    "*": ((2, 5), (2, 5), (2, 9)),
}
# A problem may appear at most this often in the training split, in different words; test problems
# are all different, and none of them occurs in the training split.
MAX_TRAIN_REPEATS = 3
FORMAT_INSTRUCTION = ' Show the calculation, then finish with "The answer is <number>."'
ERROR_TYPES = ("carry", "wrong_operation", "dropped_step", "digit_slip")

OP_SYMBOL = {"+": "+", "-": "-", "*": "×"}

_NAMES = [
    ("Mia", "she"), ("Leo", "he"), ("Ava", "she"), ("Noah", "he"), ("Zoe", "she"), ("Sam", "he"),
    ("Emma", "she"), ("Omar", "he"), ("Lily", "she"), ("Ravi", "he"), ("Nora", "she"), ("Ben", "he"),
    ("Ines", "she"), ("Kai", "he"), ("Rosa", "she"), ("Tom", "he"), ("Yuki", "she"), ("Eli", "he"),
    ("Hana", "she"), ("Max", "he"),
]  # fmt: skip
_ITEMS = [
    "apples", "stickers", "marbles", "pencils", "cookies", "books", "stamps", "shells", "cards",
    "balloons", "crayons", "eggs", "toy cars", "beads", "flowers", "coins", "buttons", "cupcakes",
]  # fmt: skip
_CONTAINERS = ["boxes", "bags", "baskets", "jars", "packs", "rows", "plates", "shelves"]

# Word problems. {a}, {b}, {c} are the operands in the order the worked answer uses them.
_TEMPLATES = {
    ("+",): [
        "{Name} has {a} {item}. {Pronoun} gets {b} more. How many {item} does {name} have now?",
        "There are {a} {item} in a box and {b} {item} on the table. How many {item} are there in all?",
        "{Name} collected {a} {item} on Monday and {b} {item} on Tuesday. How many {item} did {name} collect in total?",
        "A class has {a} {item}. The teacher brings {b} more. How many {item} does the class have now?",
    ],
    ("-",): [
        "{Name} had {a} {item} and gave {b} to a friend. How many {item} does {name} have left?",
        "A shop had {a} {item}. It sold {b} of them. How many {item} are left?",
        "{Name} has {a} {item}. {Pronoun} loses {b}. How many {item} does {name} have now?",
        "There were {a} {item} in a jar. {Name} took out {b}. How many {item} are still in the jar?",
    ],
    ("*",): [
        "There are {a} {container} with {b} {item} in each. How many {item} are there in all?",
        "{Name} buys {a} {container} of {item}. Each has {b} {item}. How many {item} does {name} buy?",
        "{Name} puts {b} {item} on each of {a} {container}. How many {item} does {name} use?",
    ],
    ("+", "-"): [
        "{Name} has {a} {item}. {Pronoun} gets {b} more and then gives away {c}. How many {item} does {name} have now?",
        "A shop had {a} {item}. It received {b} more and then sold {c}. How many {item} does the shop have now?",
    ],
    ("-", "+"): [
        "{Name} had {a} {item}, lost {b} of them, and then found {c} more. How many {item} does {name} have now?",
        "There were {a} {item} on a shelf. {Name} took {b} away and later put {c} back. How many {item} are on the shelf now?",
    ],
    ("+", "+"): [
        "{Name} got {a} {item} in the morning, {b} at noon and {c} in the evening. How many {item} did {name} get in all?",
    ],
    ("*", "+"): [
        "There are {a} {container} with {b} {item} in each, and {c} more {item} on the table. How many {item} are there in all?",
        "{Name} fills {a} {container} with {b} {item} each and has {c} {item} left over. How many {item} did {name} have?",
    ],
    ("*", "-"): [
        "There are {a} {container} with {b} {item} in each. {Name} takes away {c} {item}. How many {item} are left?",
        "{Name} buys {a} {container} of {item} with {b} in each and eats {c}. How many {item} are left?",
    ],
}


def apply_op(left: int, op: str, right: int) -> int:
    if op == "+":
        return left + right
    if op == "-":
        return left - right
    if op == "*":
        return left * right
    raise ValueError(f"unknown operation {op!r}")


def evaluate(operands: list[int], ops: list[str]) -> int:
    """Left to right: ((a op1 b) op2 c) ... -- how every record's answer is defined."""
    if len(operands) != len(ops) + 1:
        raise ValueError(f"{len(operands)} operands do not fit {len(ops)} operations")
    value = operands[0]
    for op, operand in zip(ops, operands[1:]):
        value = apply_op(value, op, operand)
    return value


# ---------------------------------------------------------------------------------------------
# Answers


_ANSWER_RE = re.compile(
    r"answer is\s*:?\s*\**\s*\$?\s*(-?\d{1,3}(?:,\d{3})+|-?\d+)(?![\d,]*\.\d)(?!\d|,\d)", re.IGNORECASE
)


def extract_answer(text: str) -> int | None:
    """The integer N of the last "The answer is N" in `text` (case-insensitive), or None.

    Accepts "answer is: N", "**N**", "$N", "1,234" and a trailing period; rejects decimals
    ("The answer is 2.5.") and text without the phrase.
    """
    if not text:
        return None
    matches = _ANSWER_RE.findall(text)
    if not matches:
        return None
    return int(matches[-1].replace(",", ""))


def is_correct(text: str, answer: int) -> bool:
    """Exact match: the last "The answer is N" of `text` states `answer`."""
    return extract_answer(text) == int(answer)


# ---------------------------------------------------------------------------------------------
# Errors a student makes


def _digits(n: int) -> list[int]:
    """Least significant digit first."""
    return [int(d) for d in reversed(str(n))]


def add_without_carry(a: int, b: int) -> int:
    """Column addition that forgets every carry: 27 + 18 -> 35."""
    da, db = _digits(a), _digits(b)
    width = max(len(da), len(db))
    da += [0] * (width - len(da))
    db += [0] * (width - len(db))
    return sum(((x + y) % 10) * 10**i for i, (x, y) in enumerate(zip(da, db)))


def sub_without_borrow(a: int, b: int) -> int:
    """Column subtraction that takes the smaller digit from the larger: 52 - 18 -> 46."""
    da, db = _digits(a), _digits(b)
    db += [0] * (len(da) - len(db))
    return sum(abs(x - y) * 10**i for i, (x, y) in enumerate(zip(da, db)))


def mul_without_carry(a: int, b: int) -> int:
    """Multiplying a number by one digit and forgetting the carries: 24 × 7 -> 148."""
    many, digit = (a, b) if b < 10 else (b, a)
    ds = _digits(many)
    low = sum(((d * digit) % 10) * 10**i for i, d in enumerate(ds[:-1]))
    return low + ds[-1] * digit * 10 ** (len(ds) - 1)


def slip_carry(left: int, op: str, right: int) -> int:
    if op == "+":
        return add_without_carry(left, right)
    if op == "-":
        return sub_without_borrow(left, right)
    return mul_without_carry(left, right)


def digit_slip(value: int, rng: random.Random) -> int:
    """Change one digit by one, or swap two neighbouring digits (45 -> 46, 44, 55, 35 or 54)."""
    text = str(value)
    options = []
    for i, ch in enumerate(text):
        for delta in (-1, 1):
            d = int(ch) + delta
            if 0 <= d <= 9 and not (i == 0 and d == 0 and len(text) > 1):
                options.append(text[:i] + str(d) + text[i + 1 :])
    for i in range(len(text) - 1):
        if text[i] != text[i + 1] and not (i == 0 and text[1] == "0"):
            options.append(text[:i] + text[i + 1] + text[i] + text[i + 2 :])
    return int(rng.choice(sorted(set(options))))


_WRONG_OP = {"+": "-", "-": "+", "*": "+"}


def _wrong_operation(left: int, op: str, right: int) -> tuple[int, str, int, int]:
    """The step done with the wrong operation; a subtraction never goes below zero."""
    wrong = _WRONG_OP[op]
    if wrong == "-" and left < right:
        left, right = right, left
    return left, wrong, right, apply_op(left, wrong, right)


# ---------------------------------------------------------------------------------------------
# Problems


def draw_stratum(rng: random.Random) -> tuple[str, str]:
    """A (kind, level) pair drawn with KIND_WEIGHTS and LEVEL_WEIGHTS."""
    kind = rng.choices(list(KIND_WEIGHTS), weights=list(KIND_WEIGHTS.values()))[0]
    if kind == "two_step":
        return kind, "two_step"
    return kind, rng.choices(list(RANGES[kind]), weights=LEVEL_WEIGHTS)[0]


def _draw_operands(kind: str, level: str, rng: random.Random) -> tuple[list[int], list[str]]:
    """Operands and operations of one problem of `kind` and `level`."""
    if kind == "two_step":
        ops = rng.choice(TWO_STEP_OPS)
        (a_low, a_high), (b_low, b_high), (c_low, c_high) = TWO_STEP_RANGES[ops[0]]
        while True:
            a, b, c = rng.randint(a_low, a_high), rng.randint(b_low, b_high), rng.randint(c_low, c_high)
            first = apply_op(a, ops[0], b)
            if first > 0 and (ops[1] != "-" or c < first):
                return [a, b, c], list(ops)
    (a_low, a_high), (b_low, b_high) = RANGES[kind][level]
    while True:
        a, b = rng.randint(a_low, a_high), rng.randint(b_low, b_high)
        if kind != "sub" or a > b:
            return [a, b], [{"add": "+", "sub": "-", "mul": "*"}[kind]]


def _steps(operands: list[int], ops: list[str]) -> list[tuple[int, str, int, int]]:
    steps, value = [], operands[0]
    for op, operand in zip(ops, operands[1:]):
        result = apply_op(value, op, operand)
        steps.append((value, op, operand, result))
        value = result
    return steps


def _render_steps(steps: list[tuple[int, str, int, int]]) -> str:
    lines = [f"{left} {OP_SYMBOL[op]} {right} = {result}." for left, op, right, result in steps]
    if len(lines) == 1:
        body = lines[0]
    else:
        body = "First, " + lines[0] + " " + " ".join("Then " + line for line in lines[1:])
    return f"{body} The answer is {steps[-1][3]}."


def _wrong_steps(
    operands: list[int], ops: list[str], error: str, rng: random.Random
) -> list[tuple[int, str, int, int]] | None:
    """The worked steps with one mistake of type `error`, carried through; None if not applicable."""
    steps = _steps(operands, ops)
    if error == "dropped_step":
        return steps[:1] if len(steps) > 1 else None
    index = rng.randrange(len(steps))
    left, op, right, result = steps[index]
    if error == "carry":
        wrong = (left, op, right, slip_carry(left, op, right))
    elif error == "wrong_operation":
        wrong = _wrong_operation(left, op, right)
    elif error == "digit_slip":
        wrong = (left, op, right, digit_slip(result, rng))
    else:
        raise ValueError(f"unknown error type {error!r}")
    if wrong[3] == result or wrong[3] < 0:
        return None
    # carry the wrong value through the remaining steps
    out = steps[:index] + [wrong]
    value = wrong[3]
    for _, later_op, later_right, _ in steps[index + 1 :]:
        later = apply_op(value, later_op, later_right)
        out.append((value, later_op, later_right, later))
        value = later
    return out if value >= 0 else None


def _question(operands: list[int], ops: list[str], rng: random.Random) -> str:
    name, pronoun = rng.choice(_NAMES)
    template = rng.choice(_TEMPLATES[tuple(ops)])
    values = dict(zip("abc", operands))
    question = template.format(
        Name=name,
        name=name,
        Pronoun=pronoun.capitalize(),
        item=rng.choice(_ITEMS),
        container=rng.choice(_CONTAINERS),
        **values,
    )
    return question + FORMAT_INSTRUCTION


def make_record(rng: random.Random, kind: str | None = None, level: str | None = None) -> dict:
    """One preference pair (of a random kind and level unless given). All randomness comes from `rng`."""
    if kind is None:
        kind, level = draw_stratum(rng)
    elif level is None:
        level = (
            "two_step" if kind == "two_step" else rng.choices(list(RANGES[kind]), weights=LEVEL_WEIGHTS)[0]
        )
    operands, ops = _draw_operands(kind, level, rng)
    answer = evaluate(operands, ops)
    question = _question(operands, ops, rng)
    errors = list(ERROR_TYPES)
    rng.shuffle(errors)
    for error in errors:
        wrong = _wrong_steps(operands, ops, error, rng)
        if wrong is not None and wrong[-1][3] != answer:
            break
    else:  # pragma: no cover - digit_slip always applies
        raise AssertionError(f"no wrong answer for {operands} {ops}")
    return {
        "prompt": [{"role": "user", "content": question}],
        "chosen": [{"role": "assistant", "content": _render_steps(_steps(operands, ops))}],
        "rejected": [{"role": "assistant", "content": _render_steps(wrong)}],
        "answer": answer,
        "rejected_answer": wrong[-1][3],
        "kind": kind,
        "level": level,
        "error": error,
        "operands": operands,
        "ops": ops,
    }


def problem_key(record: dict) -> tuple:
    """The arithmetic of a record, whatever its wording: used to keep splits apart."""
    return (tuple(record["operands"]), tuple(record["ops"]))


def generate_records(
    n: int, seed: int = DEFAULT_SEED, *, exclude: set | None = None, max_per_key: int = 1
) -> list[dict]:
    """`n` records with different prompts, none of whose problems is in `exclude`.

    A problem (its operands and operations, see :func:`problem_key`) occurs at most `max_per_key`
    times, worded differently each time.
    """
    rng = random.Random(seed)
    excluded = set(exclude or ())
    counts: Counter = Counter()
    seen_prompts: set[str] = set()
    records: list[dict] = []
    while len(records) < n:
        # Draw the kind and level first and retry within them, so that running out of the few
        # easy problems does not quietly shift the mix towards harder ones.
        kind, level = draw_stratum(rng)
        for _ in range(1000):
            record = make_record(rng, kind, level)
            key = problem_key(record)
            prompt = record["prompt"][0]["content"]
            if key not in excluded and counts[key] < max_per_key and prompt not in seen_prompts:
                break
        else:
            raise ValueError(
                f"ran out of different {kind}/{level} problems after {len(records)}; widen RANGES"
            )
        counts[key] += 1
        seen_prompts.add(prompt)
        records.append(record)
    return records


def generate_splits(
    seed: int = DEFAULT_SEED, n_train: int = TRAIN_SIZE, n_test: int = TEST_SIZE
) -> dict[str, list[dict]]:
    """The train and test splits; the test problems share no arithmetic with the training ones.

    The test split is drawn first from its own seed, so its content does not depend on n_train.
    """
    test = generate_records(n_test, seed + 1)
    train = generate_records(
        n_train, seed, exclude={problem_key(r) for r in test}, max_per_key=MAX_TRAIN_REPEATS
    )
    for split, records in (("train", train), ("test", test)):
        for i, record in enumerate(records):
            record["id"] = f"arith-{split}-{i:04d}"
    return {"train": train, "test": test}


def to_jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(_ordered(r), ensure_ascii=False, separators=(",", ":")) + "\n" for r in records)


_FIELD_ORDER = (
    "id",
    "prompt",
    "chosen",
    "rejected",
    "answer",
    "rejected_answer",
    "kind",
    "level",
    "error",
    "operands",
    "ops",
)


def _ordered(record: dict) -> dict:
    return {key: record[key] for key in _FIELD_ORDER if key in record}


def arithmetic_path(split: str) -> Path:
    """Path of the bundled JSONL file of `split` ("train" or "test")."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    return Path(str(resources.files("preftune").joinpath("resources", "arithmetic", f"{split}.jsonl")))


def load_arithmetic(split: str) -> list[dict]:
    """The bundled records of `split`, as dicts."""
    with open(arithmetic_path(split), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
