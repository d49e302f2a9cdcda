"""The reference cache (keys, hits, misses) and reference scoring on a tiny model."""

from __future__ import annotations

import shutil

import pytest
import torch

from preftune.cache import TensorCache, hash_token_lists, make_key, model_fingerprint
from preftune.references import PAIRED_SIDES, ModelView, OnlineReferences, precompute_references

# ------------------------------------------------------------------------------------------------ cache


def test_key_changes_with_every_input_and_only_with_them():
    parts = dict(role="reference", tokens="abc", model="f00", dtype="None", sides=("chosen", "rejected"))
    key = make_key(**parts)
    assert make_key(**dict(reversed(parts.items()))) == key  # argument order does not matter
    for name, other in [
        ("tokens", "abd"),
        ("model", "f01"),
        ("dtype", "torch.bfloat16"),
        ("sides", ("chosen",)),
    ]:
        assert make_key(**{**parts, name: other}) != key, name


def test_token_hash_sees_sequence_boundaries():
    assert hash_token_lists([[1, 2], [3]]) == hash_token_lists([[1, 2], [3]])
    assert hash_token_lists([[1, 2], [3]]) != hash_token_lists([[1], [2, 3]])
    assert hash_token_lists([[1]], [[2]]) != hash_token_lists([[1], [2]])


def test_tensor_cache_miss_hit_and_damaged_entry(tmp_path):
    cache = TensorCache(tmp_path, "references")
    assert cache.load("k1") is None
    tensors = {"chosen_logps": torch.randn(2, 5), "chosen_tokens": torch.arange(5)}
    cache.save("k1", tensors, meta={"split": "train"})
    got = cache.load("k1")
    assert got.keys() == tensors.keys() and all(torch.equal(got[k], v) for k, v in tensors.items())
    assert cache.load("k2") is None
    cache.path("k1").write_bytes(b"not a safetensors file")
    assert cache.load("k1") is None  # recomputed, never trusted


def test_model_fingerprint_follows_content_not_location(tiny_model_dir, tmp_path):
    from preftune.testing import save_tiny_model

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    assert model_fingerprint(copy) == model_fingerprint(tiny_model_dir)
    save_tiny_model(copy, vocab_size=512, seed=7)
    assert model_fingerprint(copy) != model_fingerprint(tiny_model_dir)


def test_a_damaged_fingerprint_memo_is_hashed_again(tiny_model_dir, tmp_path, monkeypatch):
    """Two processes hashing one model at once: the reader of a half-written memo got an empty digest
    (another cache key than its peer's). The memo is written atomically and checked when read."""
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    digest = model_fingerprint(tiny_model_dir)
    memos = list((tmp_path / "cache" / "fingerprints").iterdir())
    assert [m.read_text() for m in memos] == [digest]  # one memo, whole, no temporary file left
    for damaged in ("", digest[:20], "not a digest\n"):
        memos[0].write_text(damaged)
        assert model_fingerprint(tiny_model_dir) == digest, repr(damaged)
    assert memos[0].read_text() == digest  # rewritten whole


# ------------------------------------------------------------------------------------------- references


@pytest.fixture
def view(tiny_model_dir, pair_files):
    from transformers import AutoTokenizer

    from preftune.data import load_examples, tokenize_dataset

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    items, _ = tokenize_dataset(load_examples(pair_files[1]), tok, max_length=128, progress=False)
    view = ModelView(str(tiny_model_dir), tiny_model_dir, tok)
    view.tokenized["eval"] = items
    return view


def _one_by_one(view, side):
    """Each sequence scored alone, without any batching, cache or reference machinery."""
    from transformers import AutoModelForCausalLM

    from preftune.data.collate import collate_sequences
    from preftune.scoring import score_batch

    model = AutoModelForCausalLM.from_pretrained(view.path).eval()
    prompts, completions = view.sequences("eval", side)
    with torch.no_grad():
        return torch.cat(
            [
                score_batch(model, **collate_sequences([p], [c], view.pad_token_id)).logps
                for p, c in zip(prompts, completions)
            ]
        )


def test_precomputed_scores_equal_fresh_scoring_and_the_cache_is_reused(view, tmp_path, monkeypatch):
    from preftune import references

    first = precompute_references(
        [view], ["eval"], PAIRED_SIDES, cache_root=tmp_path, progress=False, log=print
    )
    for side in PAIRED_SIDES:
        logps = first.scores["eval"][f"{side}_logps"]
        assert logps.shape == (1, len(view.tokenized["eval"]))
        torch.testing.assert_close(logps[0], _one_by_one(view, side), atol=1e-5, rtol=1e-5)

    def no_model(*args, **kwargs):
        raise AssertionError("a cache hit must not load the reference model")

    monkeypatch.setattr(references, "_load_reference_model", no_model)
    messages = []
    second = precompute_references(
        [view], ["eval"], PAIRED_SIDES, cache_root=tmp_path, progress=False, log=messages.append
    )
    assert any("cached scores reused" in m for m in messages)
    for name, value in first.scores["eval"].items():
        assert torch.equal(second.scores["eval"][name], value), name


def test_online_references_score_like_precomputed_ones(view, tmp_path):
    pre = precompute_references(
        [view], ["eval"], PAIRED_SIDES, cache_root=tmp_path, progress=False, log=print
    )
    online = OnlineReferences([view], policy=None)
    index = [3, 0, 5]
    a, b = pre.batch("eval", index, PAIRED_SIDES), online.batch("eval", index, PAIRED_SIDES)
    for side in PAIRED_SIDES:
        torch.testing.assert_close(b.logps[side], a.logps[side], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b.entropy[side], a.entropy[side], atol=1e-5, rtol=1e-5)
