#!/usr/bin/env bash
# Issue 9's checks on a lent GPU machine, in the two calls its limits allow (see
# benchmarks/README.md, "On a lent GPU"). Run from the repository root there:
#
#   bash benchmarks/device_check.sh first    # GPU tests that need no demo model
#   bash benchmarks/device_check.sh second   # the demo-model GPU tests, then `bench_gpu.py`
#
# The device image has CuPy (cupy-cuda13x), PyTorch and transformers but no network: what it
# lacks comes along in ignored folders that `benchmarks/device_prepare.sh` fills here. One call
# carries at most 64 MiB, and the demo model's GGUF is 98 MB, so it travels in two halves,
# .device1 in the first call and .device2 in the second; files a call leaves on the machine stay
# there for the next one while it is warm.
set -uo pipefail
stage=${1:?first or second}
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}

# gguf (the demo model's reader), carried as a wheel
if ls .device1/wheels/*.whl >/dev/null 2>&1 && [ ! -d /tmp/site/gguf ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .device1/wheels/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD

export MINPHI3_CACHE=/tmp/minphi3-cache
mkdir -p "$MINPHI3_CACHE"
gguf=$MINPHI3_CACHE/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$gguf" ] && [ -f .device1/gguf.part1 ] && [ -f .device2/gguf.part2 ]; then
    cat .device1/gguf.part1 .device2/gguf.part2 > "$gguf"
fi

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    $PY -c "import cupy, numpy, torch, transformers; print('cupy', cupy.__version__, 'numpy', numpy.__version__,
'torch', torch.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/machine-$stage.txt"

case $stage in
first)
    $PY -m pytest -q -m gpu tests/test_gpu.py -k "not demo" -p no:cacheprovider -rs 2>&1 | tee "$OUT/pytest-gpu-first.log"
    ;;
second)
    $PY -m pytest -q -m gpu tests/test_gpu.py -k demo -p no:cacheprovider -rs 2>&1 | tee "$OUT/pytest-gpu-second.log"
    $PY benchmarks/bench_gpu.py --rounds 2 --repeats 2 2>&1 | tee "$OUT/bench-gpu.log"
    cp benchmarks/results/gpu.json "$OUT/" 2>/dev/null
    ;;
*)
    echo "device_check.sh: expected first or second, got $stage" >&2
    exit 2
    ;;
esac
