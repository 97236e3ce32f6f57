#!/usr/bin/env bash
# One prepared GPU session: correctness of noln_core on CUDA, then the benchmark in float32 and bfloat16.
# Run on the device machine from the repository root; results land in $OUT (or ./artifacts/gpu).
set -uo pipefail
OUT=${OUT:-artifacts/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"
# 1. The library's tests that need no Streamlit or browser, on the GPU (NOLN_TEST_DEVICE=cuda).
NOLN_TEST_DEVICE=cuda timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -25 | tee "$OUT/tests.txt"
# 2. The benchmark, float32 then bfloat16.
timeout 200 python3 -m bench.run --device cuda --dtype float32 --no-app --out "$OUT/bench_float32.md" 2>&1 | grep -v Loading | tail -20
timeout 150 python3 -m bench.run --device cuda --dtype bfloat16 --no-app --out "$OUT/bench_bfloat16.md" 2>&1 | grep -v Loading | tail -20
# 3. The study: throughput against HF forwards and peak host memory, on the GPU.
timeout 200 python3 -m bench.study --device cuda --batches 4 --repeats 3 2>&1 | grep "^|" | tee "$OUT/bench_study.md"
# 4. LN removal on the GPU: bf16 mixed precision, GPT-2 small's shape (random weights), the small preset's schedule
#    on a short budget; steps/s and peak memory, and the result loads LN-free. (FSDP needs 2+ GPUs: not run on one.)
timeout 300 python3 -m bench.removal --device cuda --out "$OUT/bench_removal.md" 2>&1 | tail -20
