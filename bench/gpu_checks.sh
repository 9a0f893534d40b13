#!/usr/bin/env bash
# The GPU checks in one short run, for a GPU machine lent for minutes: the Triton kernels
# against eager, torch.compile and Liger-Kernel (bench/kernels.py, paper App. A), then FSDP2
# training throughput, peak memory and MFU of the `ablation` preset (bench/train_throughput.py).
# Each step has its own time limit so one that hangs cannot take the others with it; results
# go to $OUT (default /tmp/gpu_checks) as kernels.md, throughput.json and the full log.
#
#     bash bench/gpu_checks.sh
#
# Liger-Kernel is not a dependency of this project; when a wheel of it sits in .whl/ (the
# machine may be offline: `pip download --no-deps -d .whl liger-kernel`), it is installed to
# a scratch folder first so the table gets its column.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, triton; print('torch', torch.__version__, '· triton', triton.__version__)"
    echo "## kernels"
    timeout 300 python3 bench/kernels.py | tee "$OUT/kernels.md"
    echo "kernels: exit $?"
    echo "## FSDP2 throughput (ablation preset, batch 32, 512²)"
    timeout 240 python3 bench/train_throughput.py --json "$OUT/throughput.json"
    echo "throughput: exit $?"
} 2>&1 | tee "$OUT/log.txt"
