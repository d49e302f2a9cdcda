#!/usr/bin/env bash
# The device check, from the repository root of a lent GPU machine, as one command (< 8 minutes):
#
#   bash bench/device_check.sh             # installs .whl/ offline, then bench/device_check.py
#   bash bench/device_check.sh --dry-run   # on a CPU: toy sizes, no install (tests/test_bench_device.py)
#
# The wheels come from scripts/device_wheels.sh (run here, beforehand) and travel in .whl/ (the run
# tool's carry: [".whl"]). Results go to $OUT (the folder the lent machine sends back; default
# ./device-check-out): device_check.json, device_check.log, gpu_tests.log/.xml, profile.txt, install.log.
# Every other argument goes to bench/device_check.py (--pairs, --steps, --budget, --phases, ...).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
export OUT=${OUT:-$PWD/device-check-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false HF_HOME=${HF_HOME:-/tmp/preftune-device-check-hf}
SITE=${DEVICE_CHECK_SITE:-/tmp/preftune-device-check-site}
install=1   # DEVICE_CHECK_INSTALL=1 installs the wheels in a dry run too (a rehearsal of the install)
limit=470   # seconds for everything after the install (the driver's own budget is 420)
for a in "$@"; do
    # a dry run, on a CPU that may be shared, gets the driver's slack (4x) here too
    [ "$a" = "--dry-run" ] && install=${DEVICE_CHECK_INSTALL:-0} && limit=1880
done
LIMIT=${DEVICE_CHECK_TIMEOUT:-$limit}
start=$(date +%s)
if [ "$install" = 1 ]; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        # offline, only the carried wheels, none of their dependencies (the image has them); a --target
        # folder first on PYTHONPATH leaves the image's own packages untouched
        timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" .whl/*.whl >"$OUT/install.log" 2>&1
        echo "install: exit $? in $(($(date +%s) - start)) s: $(cd .whl && ls *.whl | tr '\n' ' ')" | tee -a "$OUT/install.log"
        export PYTHONPATH="$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "install: no .whl/*.whl here (scripts/device_wheels.sh, carry .whl): TRL's phase will fail" | tee "$OUT/install.log"
        export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
    fi
else
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
timeout -k 10 "$LIMIT" "$PY" bench/device_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/device_check.log"
code=${PIPESTATUS[0]}
echo "device check: exit $code after $(($(date +%s) - start)) s" | tee -a "$OUT/device_check.log"
exit "$code"
