"""Save and load nested training state without pickle: ``<name>.safetensors`` + ``<name>.json``.

A checkpoint directory is user-writable, so nothing read from it may run code: ``torch.load`` with
``weights_only=False`` (pickle) would execute whatever a crafted file asks for. Here the tensors go
to a safetensors file and the structure around them to JSON, which can only describe data.

The tree may hold dicts (str/int/float/bool/None keys), lists, tuples, None, bools, ints, floats,
strings, torch tensors and numpy arrays/scalars: enough for optimizer and LR-scheduler state dicts,
``random.getstate()``, ``torch.get_rng_state()`` and ``numpy.random.get_state()``. Everything loads
back with its exact type (tuples stay tuples, int dict keys stay ints, tensors keep dtype and shape).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

FORMAT = "preftune-state/1"


class StateFileError(ValueError):
    """A state file is missing, malformed, or a value cannot be stored."""


def paths(directory: str | Path, name: str) -> tuple[Path, Path]:
    """The (JSON, safetensors) pair that holds state ``name`` in ``directory``."""
    directory = Path(directory)
    return directory / f"{name}.json", directory / f"{name}.safetensors"


def exists(directory: str | Path, name: str) -> bool:
    return all(p.is_file() for p in paths(directory, name))


def save_state(state: Any, directory: str | Path, name: str) -> None:
    """Write ``state`` as ``directory/<name>.json`` (the tree) and ``<name>.safetensors`` (its tensors)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, tensors, "state")
    json_path, tensor_path = paths(directory, name)
    save_file(tensors, str(tensor_path))
    json_path.write_text(json.dumps({"format": FORMAT, "tree": tree}, allow_nan=False))


def load_state(directory: str | Path, name: str) -> Any:
    """Read back what :func:`save_state` wrote; errors name the file."""
    from safetensors.torch import load_file

    json_path, tensor_path = paths(directory, name)
    try:
        doc = json.loads(json_path.read_text())
    except (OSError, ValueError) as e:
        raise StateFileError(f"{json_path}: cannot read: {e}") from e
    try:
        tensors = load_file(str(tensor_path))
    except Exception as e:  # OSError, or safetensors' own SafetensorError for a damaged file
        raise StateFileError(f"{tensor_path}: cannot read: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise StateFileError(f"{json_path}: not a {FORMAT} file")
    try:
        return _decode(doc["tree"], tensors)
    except (KeyError, TypeError, ValueError) as e:
        raise StateFileError(f"{json_path}: malformed state: {e}") from e


# --------------------------------------------------------------------------------------------------
# Encoding: every container and every non-JSON scalar is a one-key tagged object, so that a plain
# JSON dict never appears in the tree and decoding is unambiguous.


def _encode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    # numpy first: np.float64 is a float subclass, and must come back as np.float64
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a torch dependency in practice
        np = None
    if np is not None and isinstance(value, (np.ndarray, np.generic)):
        array = np.asarray(value)
        if array.dtype.hasobject:
            raise StateFileError(f"{where}: numpy arrays of Python objects cannot be stored")
        key = str(len(tensors))
        raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        tensors[key] = torch.from_numpy(raw.copy())
        tag = "ndarray" if isinstance(value, np.ndarray) else "npscalar"
        return {tag: key, "dtype": array.dtype.str, "shape": list(array.shape)}
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        # safetensors wants dense, contiguous, unshared CPU tensors
        tensors[key] = value.detach().to("cpu").contiguous().clone()
        return {"tensor": key}
    if isinstance(value, (list, tuple)):
        items = [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
        return {"tuple": items} if isinstance(value, tuple) else {"list": items}
    if isinstance(value, dict):
        entries = []
        for k, v in value.items():
            if not (k is None or isinstance(k, (bool, int, float, str))):
                raise StateFileError(f"{where}: dict key {k!r} of type {type(k).__name__} cannot be stored")
            entries.append([_encode(k, tensors, where), _encode(v, tensors, f"{where}[{k!r}]")])
        return {"dict": entries}
    raise StateFileError(f"{where}: values of type {type(value).__name__} cannot be stored")


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, list):  # only tagged objects hold lists
        raise ValueError("untagged list")
    if not isinstance(node, dict):
        raise TypeError(f"unexpected {type(node).__name__}")
    if "tensor" in node:
        return tensors[node["tensor"]]
    if "list" in node:
        return [_decode(v, tensors) for v in node["list"]]
    if "tuple" in node:
        return tuple(_decode(v, tensors) for v in node["tuple"])
    if "dict" in node:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in node["dict"]}
    if "float" in node:
        return float(node["float"])
    if "ndarray" in node or "npscalar" in node:
        import numpy as np

        raw = tensors[node.get("ndarray", node.get("npscalar"))].numpy()
        dtype = np.dtype(node["dtype"])
        if dtype.hasobject:
            raise ValueError("object arrays are not allowed")
        array = raw.view(dtype).reshape(node["shape"]).copy()
        return array if "ndarray" in node else array[()]
    raise ValueError(f"unknown node {sorted(node)}")
