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
