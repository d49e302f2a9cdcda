"""The reference cache never serves damaged numbers: a flipped byte, a truncated file, an entry with
too few rows or a missing sidecar is recomputed (with a warning naming the entry), and a clean entry is
reused without scoring anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from preftune import references
from preftune.cache import TensorCache
from preftune.data import TokenizedExample
from preftune.references import ModelView, precompute_references


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    gen = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(5, 500, (n,), generator=gen).tolist()

    items = [
        TokenizedExample(
            prompt_ids=ids(4 + i % 3),
            chosen_ids=ids(3 + i % 2),
            rejected_ids=ids(2 + i % 4),
            row=i + 1,
            prompt_text=f"prompt {i}",
            truncated=False,
        )
        for i in range(6)
    ]
    return model, tokenizer, items


def _view(tiny_model_dir, tokenizer, items):
    view = ModelView("policy", Path(tiny_model_dir), tokenizer)
    view.tokenized["train"] = list(items)
    return view


def _run(setup, tiny_model_dir, cache_root, monkeypatch, items=None):
    """(scores, number of score_dataset calls, warnings)."""
    model, tokenizer, default_items = setup
    calls, warnings = [], []
    real = references.score_dataset

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(references, "score_dataset", counting)
    out = precompute_references(
        [_view(tiny_model_dir, tokenizer, items or default_items)],
        ["train"],
        ("chosen", "rejected"),
        policy=model,
        cache_root=cache_root,
        progress=False,
        log=warnings.append,
    )
    # entries are memory-mapped: copy before the tests damage the file in place (preftune itself
    # only ever replaces entries by renaming a new file over them, which leaves mapped pages intact)
    scores = {name: value.clone() for name, value in out.scores["train"].items()}
    return scores, len(calls), [w for w in warnings if "not used" in w]


def _entry(cache_root) -> Path:
    (path,) = (cache_root / "references").glob("*.safetensors")
    return path


def _same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_a_clean_entry_is_reused_without_scoring(setup, tiny_model_dir, tmp_path, monkeypatch):
    clean, calls, _ = _run(setup, tiny_model_dir, tmp_path, monkeypatch)
    assert calls == 2  # chosen and rejected
    again, calls, warned = _run(setup, tiny_model_dir, tmp_path, monkeypatch)
    assert calls == 0 and not warned
    _same(clean, again)
    meta = json.loads(_entry(tmp_path).with_suffix(".json").read_text())
    assert meta["shapes"]["chosen_logps"] == [6] and len(meta["sha256"]) == 64
    assert not [p for p in (tmp_path / "references").iterdir() if ".tmp" in p.name]


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 24, len(data) - 8):  # inside the tensor data, past the header
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _drop_sidecar(path: Path) -> None:
    path.with_suffix(".json").unlink()


@pytest.mark.parametrize(
    ("damage", "why"),
    [(_flip_bytes, "sha256"), (_truncate, "sha256"), (_drop_sidecar, "metadata file is missing")],
)
def test_a_damaged_entry_is_recomputed_and_equals_a_clean_run(
    setup, tiny_model_dir, tmp_path, monkeypatch, damage, why
):
    clean, _, _ = _run(setup, tiny_model_dir, tmp_path, monkeypatch)
    entry = _entry(tmp_path)
    damage(entry)
    again, calls, warned = _run(setup, tiny_model_dir, tmp_path, monkeypatch)
    assert calls == 2
    assert len(warned) == 1 and entry.name in warned[0] and why in warned[0]
    _same(clean, again)
    # the recomputed entry was written back and is trusted next time
    _, calls, warned = _run(setup, tiny_model_dir, tmp_path, monkeypatch)
    assert calls == 0 and not warned


def test_an_entry_with_too_few_rows_is_recomputed(setup, tiny_model_dir, tmp_path, monkeypatch):
    clean, _, _ = _run(setup, tiny_model_dir, tmp_path, monkeypatch)
    entry = _entry(tmp_path)
    # A consistent (checksummed) entry that holds 4 rows where the data has 6: e.g. written by a
    # build whose key missed a change. It must not be indexed (IndexError) nor used.
    cache = TensorCache(tmp_path, "references")
    short = {k: v[:4] for k, v in cache.load(entry.stem).items()}
    cache.save(entry.stem, short)
    again, calls, warned = _run(setup, tiny_model_dir, tmp_path, monkeypatch)
    assert calls == 2
    assert len(warned) == 1 and entry.name in warned[0] and "expected 6 rows" in warned[0]
    _same(clean, again)


def test_a_write_killed_midway_leaves_no_entry(tmp_path, monkeypatch):
    from preftune import cache as cache_module

    def dying_save(tensors, path):
        Path(path).write_bytes(b"half an entry")
        raise KeyboardInterrupt  # the process is stopped mid-write

    monkeypatch.setattr(cache_module, "save_file", dying_save)
    cache = TensorCache(tmp_path, "references")
    with pytest.raises(KeyboardInterrupt):
        cache.save("k", {"x": torch.zeros(3)})
    assert list((tmp_path / "references").iterdir()) == []
    assert cache.load("k") is None


def test_entries_are_memory_mapped_and_equal_what_safetensors_reads(tmp_path):
    from safetensors.torch import load_file

    from preftune.cache import map_safetensors

    tensors = {
        "logps": torch.randn(7),
        "stack": torch.randn(3, 5, dtype=torch.float64),
        "tokens": torch.arange(7),
        "flags": torch.tensor([True, False]),
        "half": torch.randn(4).half(),
        "empty": torch.zeros(0, 3),
    }
    cache = TensorCache(tmp_path, "references")
    path = cache.save("k", tensors)
    mapped = map_safetensors(path)
    expected = load_file(path)
    assert mapped.keys() == expected.keys()
    for name, value in expected.items():
        assert mapped[name].dtype == value.dtype and torch.equal(mapped[name], value), name
    # backed by the file itself: the tensor's memory lies in a mapping of the entry (Linux /proc)
    maps = Path("/proc/self/maps")
    if maps.exists():
        pointer = mapped["stack"].data_ptr()
        regions = [line.split() for line in maps.read_text().splitlines()]
        owner = [
            r[-1] for r in regions if int(r[0].split("-")[0], 16) <= pointer < int(r[0].split("-")[1], 16)
        ]
        assert owner == [str(path)], owner
    got = cache.load("k", rows={"logps": 7})
    assert torch.equal(got["stack"], tensors["stack"])
    # bf16 (which numpy cannot map) is read whole, with the same values
    cache.save("b", {"x": torch.randn(5).bfloat16()})
    assert torch.equal(cache.load("b")["x"], load_file(cache.path("b"))["x"])


def test_a_header_that_lies_about_its_byte_ranges_is_rejected(tmp_path):

    cache = TensorCache(tmp_path, "references")
    path = cache.save("k", {"logps": torch.randn(8)})
    data = path.read_bytes()
    header = data[8 : 8 + int.from_bytes(data[:8], "little")]
    bad = header.replace(b'"shape":[8]', b'"shape":[9]')
    assert bad != header
    path.write_bytes(data[:8] + bad + data[8 + len(header) :])
    warnings = []
    cache.warn = warnings.append
    assert cache.load("k", verify=False) is None and "not used" in warnings[0]
