"""Our token ids equal TRL 1.16 DPOTrainer's for the same tokenizer and data.

TRL has no public tokenize function: its tokenization lives in ``DPOTrainer._prepare_dataset`` (extract
prompt, append EOS, tokenize, split at the common prefix, drop prompts that fill ``max_length``) and
truncation in the public ``DataCollatorForPreference``. ``_prepare_dataset`` only reads
``self._tokenizer``, so we call it unbound with a stub instead of building a trainer; if a TRL
release changes that, the test skips rather than fails.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from preftune.data import load_examples, tokenize_dataset

from .conftest import write_jsonl

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer", reason="TRL is a dev dependency for parity tests")

PLAIN = [
    {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    {"prompt": "The sky is ", "chosen": "blue.", "rejected": "green."},  # tokens merge across the boundary
    {
        "prompt": "Q: where is the sun?\nA:",
        "chosen": " In the sky.</s>",
        "rejected": " In the sea, deep down.",
    },
    {"prompt": "def f(x):\n", "chosen": "    return x * 2\n", "rejected": "    pass"},
    {"prompt": "word " * 30, "chosen": " a", "rejected": " b"},  # prompt alone fills max_length below
]
USER = {"role": "user", "content": "Sky color?"}
CHAT = [
    {
        "prompt": [{"role": "system", "content": "Be brief."}, USER],
        "chosen": [{"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "assistant", "content": "Green, mostly, in the early morning."}],
    },
    {
        "prompt": [USER],
        "chosen": [{"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "assistant", "content": "Red."}],
    },
]
IMPLICIT = [
    {
        "chosen": [USER, {"role": "assistant", "content": "Blue."}],
        "rejected": [USER, {"role": "assistant", "content": "Red."}],
    },
    {
        "chosen": [
            USER,
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Sure?"},
            {"role": "assistant", "content": "Yes."},
        ],
        "rejected": [
            USER,
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Sure?"},
            {"role": "assistant", "content": "No, it is mostly grey."},
        ],
    },
]


def trl_tokenize(rows, tokenizer, max_length):
    from datasets import Dataset

    stub = SimpleNamespace(_tokenizer=tokenizer)
    args = SimpleNamespace(dataset_num_proc=None, max_length=max_length, truncation_mode="keep_start")
    try:
        dataset = trl_dpo.DPOTrainer._prepare_dataset(stub, Dataset.from_list(rows), tokenizer, args, "train")
    except (AttributeError, TypeError) as error:  # internals moved in another TRL release
        pytest.skip(f"TRL's _prepare_dataset is not callable this way: {error}")
    return dataset.to_list()


def trl_collate(examples, tokenizer, max_length):
    """The sequences TRL's collator feeds the model: (prompt+chosen, prompt+rejected, completion masks)."""
    collator = trl_dpo.DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=max_length)
    batch = collator.torch_call(examples)
    n = len(examples)
    sequences = []
    for i in range(2 * n):
        keep = batch["attention_mask"][i].bool()
        sequences.append((batch["input_ids"][i][keep].tolist(), batch["completion_mask"][i][keep].tolist()))
    return sequences[:n], sequences[n:]


def ours(rows, tokenizer, max_length, tmp_path):
    outputs, _ = tokenize_dataset(
        load_examples(write_jsonl(tmp_path / "data.jsonl", rows)),
        tokenizer,
        max_length=max_length,
        on_error="skip",
        progress=False,
    )
    return outputs


def as_sequences(outputs):
    chosen = [
        (o.prompt_ids + o.chosen_ids, [0] * len(o.prompt_ids) + [1] * len(o.chosen_ids)) for o in outputs
    ]
    rejected = [
        (o.prompt_ids + o.rejected_ids, [0] * len(o.prompt_ids) + [1] * len(o.rejected_ids)) for o in outputs
    ]
    return chosen, rejected


@pytest.mark.parametrize("rows", [PLAIN, CHAT, IMPLICIT], ids=["plain", "chat", "implicit-prompt"])
def test_untruncated_ids_equal_trl(rows, tiny_tokenizer, tmp_path):
    theirs = trl_tokenize(rows, tiny_tokenizer, max_length=None)
    mine = ours(rows, tiny_tokenizer, None, tmp_path)
    assert [(o.prompt_ids, o.chosen_ids, o.rejected_ids) for o in mine] == [
        (t["prompt_ids"], t["chosen_ids"], t["rejected_ids"]) for t in theirs
    ]


def test_truncated_sequences_and_dropped_rows_equal_trl(tiny_tokenizer, tmp_path):
    max_length = 12
    theirs = trl_tokenize(PLAIN, tiny_tokenizer, max_length=max_length)
    mine = ours(PLAIN, tiny_tokenizer, max_length, tmp_path)
    # Prompts that fill max_length: TRL drops them, we skip them (or raise, by default).
    assert [PLAIN[o.row - 1]["prompt"] for o in mine] == [t["prompt"] for t in theirs]
    assert 0 < len(mine) < len(PLAIN)
    assert as_sequences(mine) == trl_collate(
        [{k: t[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for t in theirs],
        tiny_tokenizer,
        max_length,
    )
    assert any(o.truncated for o in mine)
