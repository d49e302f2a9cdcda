import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama + ChatML BPE tokenizer saved as a local HF directory."""
    from preftune.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-policy"), vocab_size=512, seed=0)


@pytest.fixture(scope="session")
def other_tokenizer_model_dir(tmp_path_factory):
    """A second tiny model whose tokenizer (and vocabulary size) differs from tiny_model_dir's."""
    from preftune.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-other"), vocab_size=384, seed=1, hidden_size=48)


@pytest.fixture(scope="session")
def tied_head_model_dir(tmp_path_factory):
    """A tiny Llama whose head is tied to its embedding, as SmolLM2's is, and outweighs (1 MB in
    float32) what LoRA trains, as SmolLM2's does (113 MB against ~10 MB of adapters)."""
    from preftune.testing import tiny_llama, tiny_tokenizer

    directory = tmp_path_factory.mktemp("tied-head-policy")
    tokenizer = tiny_tokenizer(512)
    model = tiny_llama(8192, tie_word_embeddings=True)  # the tokenizer uses the first 512 rows
    for key in ("pad", "eos", "bos"):
        setattr(model.config, f"{key}_token_id", getattr(tokenizer, f"{key}_token_id"))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
