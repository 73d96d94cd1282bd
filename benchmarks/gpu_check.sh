#!/usr/bin/env bash
# The GPU checks in one prepared run for a lent GPU, under 5 minutes by the time limits below
# (FAST=1 adds the compiled fast path of benchmarks/train.py, about 6 minutes more: inductor's
# compilations take most of it):
#   1. the CUDA tests: Triton kernels against the float64 loop, autocast and half-precision
#      numerics, the compiled models, a DDP fit on one device with bf16-mixed, device-resident
#      batches against the DataLoader's, the compiled step with CUDA graphs against eager;
#   2. benchmarks/norms.py and benchmarks/train.py on the GPU (float32 and bf16; train.py
#      times the DataLoader path and the fast path: device-resident data, compiled step).
# Logs and tables go to the folder given as $1 (default: $OUT where the device tool sets it,
# else gpu_check/). Usage, from the repository root:  bash benchmarks/gpu_check.sh [DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_check}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; \
print(torch.__version__, torch.cuda.get_device_name())" 2>&1 | tee "$out/device.txt" || exit 1
status=0
timeout 150 python3 -m pytest -q -p no:cacheprovider -x \
    tests/norm/test_triton.py tests/norm/test_numerics.py tests/test_compiled_models.py \
    tests/scale/test_gpu.py 2>&1 | tee "$out/tests.txt" || status=1
timeout 60 python3 benchmarks/norms.py --device cuda --repeats 20 \
    --names dn 'dn*' bn 'bn*' ln 'ln*' lrn --compiled 2>&1 | tee "$out/norms.txt" || status=1
paths=(loader) limit=40
if [ "${FAST:-0}" = 1 ]; then paths=(loader fast) limit=180; fi
for precision in 32-true bf16-mixed; do
    timeout "$limit" python3 benchmarks/train.py --device cuda --precision "$precision" \
        --repeats 30 --norms none 'dn*' --paths "${paths[@]}" 2>&1 \
        | tee "$out/train-$precision.txt" || status=1
done
exit "$status"
