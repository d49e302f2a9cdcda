"""Seeding and the global RNG states: Python's, torch's (CPU and CUDA) and numpy's.

:func:`set_seed` starts a run; :func:`rng_state` and :func:`set_rng_state` carry the streams across a
checkpoint (``rng.safetensors`` + ``rng.json``, see :mod:`preftune.checkpointing`), so a resumed run
draws what an uninterrupted one would.
"""

from __future__ import annotations

import random

import torch


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def rng_state() -> dict:
    """Python's, torch's (CPU and CUDA) and numpy's global RNG states."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
