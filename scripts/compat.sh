#!/usr/bin/env bash
# The fast test suite against pinned versions of the core stack, in a fresh virtual environment.
#
#   scripts/compat.sh                 # the lent GPU machine's stack: torch 2.11.0, transformers 5.17.0,
#                                     # accelerate 1.15.0 (Python 3.12 when there is one, as there)
#   TORCH=2.4.1 TRANSFORMERS=4.56.2 ACCELERATE=1.10.1 scripts/compat.sh      # other versions
#   scripts/compat.sh -- tests/engine/test_training.py -x                      # pytest arguments
#
# Variables: TORCH, TRANSFORMERS, ACCELERATE (exact versions), PYTHON (the interpreter the venv is made
# from; default python3.12 if found, else python3), VENV (default /tmp/preftune-compat-<versions>; an
# existing one is reused), EXTRA_PINS (more "name==version" requirements, space-separated), MARKERS
# (pytest -m; default "not slow").
#
# Which torch build: PyPI's Linux x86-64 torch wheels are CUDA builds (the torch wheel ~0.5 GB plus
# ~3 GB of nvidia-* wheels); they install and run on a machine without a GPU, on the CPU. Any torch
# version PyPI serves for the interpreter works here; TORCH selects it.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH=${TORCH:-2.11.0}
TRANSFORMERS=${TRANSFORMERS:-5.17.0}
ACCELERATE=${ACCELERATE:-1.15.0}
MARKERS=${MARKERS:-not slow}
EXTRA_PINS=${EXTRA_PINS:-}
if [ -z "${PYTHON:-}" ]; then
    for candidate in "$HOME"/.pyenv/versions/3.12*/bin/python3.12 "$(command -v python3.12 || true)" python3; do
        if [ -n "$candidate" ] && "$candidate" -c 'import venv' >/dev/null 2>&1; then
            PYTHON=$candidate
            break
        fi
    done
fi
VENV=${VENV:-/tmp/preftune-compat-torch$TORCH-tf$TRANSFORMERS-acc$ACCELERATE}
[ "${1:-}" = "--" ] && shift

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
# setuptools comes with the dev extra (>= 77: a venv's bundled one can predate pyproject.toml's SPDX
# license string, which test_habits reads through setuptools), resolved together with torch's own bound
"$VENV/bin/python" -m pip install -q --upgrade pip
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install -q "torch==$TORCH" "transformers==$TRANSFORMERS" "accelerate==$ACCELERATE" \
    $EXTRA_PINS -e ".[dev]"
"$VENV/bin/python" - <<'PY'
import importlib.metadata as m, platform
names = ["torch", "transformers", "accelerate", "peft", "trl", "datasets", "safetensors", "numpy", "setuptools"]
print("compat:", "Python", platform.python_version(), *(f"{n} {m.version(n)}" for n in names))
PY
unset PYTHONPATH
export HF_HUB_OFFLINE=1
exec "$VENV/bin/python" -m pytest -q -m "$MARKERS" -p no:cacheprovider "$@"
