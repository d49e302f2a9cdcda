#!/usr/bin/env bash
# The wheels bench/device_check.sh installs on the lent GPU machine, which has no network: downloaded
# here into .whl/ (ignored by git; the run tool's carry: [".whl"]), and the size check of what travels.
#
#   scripts/device_wheels.sh          # download, then check tree + wheels < 64 MiB
#   scripts/device_wheels.sh --check  # only the size check
#
# Only what the machine's image lacks (its package list: the device tool's KINDS.md, "Python packages
# already there"): datasets and the two packages of its own that the image does not hold (dill,
# multiprocess), and TRL. Everything else they need is in the image (pyarrow, pandas, fsspec, xxhash,
# huggingface-hub, aiohttp, requests, tqdm, psutil, rich, ...), as are torch, transformers, accelerate,
# peft, triton. CPython 3.12, manylinux x86-64, one version of each, --no-deps (each named here).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=.whl
LIMIT_MIB=64
WHEELS=(
    "trl==${TRL_VERSION:-1.16.*}"
    "datasets==${DATASETS_VERSION:-5.2.0}"   # the version the dev venv tests TRL 1.16 with
    "dill==0.4.1"                            # datasets 5.2: dill<0.4.2
    "multiprocess==0.70.19"                  # datasets 5.2: multiprocess<0.70.20 (py312 wheel)
)

if [ "${1:-}" != "--check" ]; then
    rm -rf "$DEST"
    mkdir -p "$DEST"
    for spec in "${WHEELS[@]}"; do
        "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --abi cp312 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 --platform any -d "$DEST" "$spec"
    done
fi

ls -l "$DEST"/*.whl | awk '{printf "  %8.2f MiB  %s\n", $5 / 1048576, $9}'
wheels=$(cat "$DEST"/*.whl | wc -c)
# the working tree as the run tool sends it: tracked files and untracked files git does not ignore
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
total=$((tree + wheels))
awk -v t="$tree" -v w="$wheels" -v s="$total" -v l="$LIMIT_MIB" 'BEGIN {
    printf "tree %.2f MiB + wheels %.2f MiB = %.2f MiB of %d MiB\n", t / 1048576, w / 1048576, s / 1048576, l
}'
if [ "$total" -ge $((LIMIT_MIB * 1048576)) ]; then
    echo "over the run tool's limit: carry less" >&2
    exit 1
fi
