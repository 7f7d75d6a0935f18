#!/usr/bin/env bash
# One call on a GPU machine: device facts, every GPU test (Triton, Mosaic, the backend
# contract) and a smoke run of each benchmark script. Logs go to $OUT (default ./gpu-out).
# The five groups run side by side, so the benchmark timings here are smoke tests only.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python3}
$PY - > "$OUT/device.txt" 2>&1 <<'PYEOF'
import jax
from pisa_jax.kernels import _common, dispatch
d = jax.devices()[0]
print(d.device_kind, jax.__version__, jax.default_backend(),
      {a: getattr(d, a, "MISSING") for a in ("core_count", "compute_capability",
                                               "shared_memory_per_block_optin")})
print("SMs", _common.multiprocessor_count(), "shared memory", _common.shared_memory_per_block(),
      "mosaic unavailable:", dispatch.mosaic_unavailable())
PYEOF
(timeout 500 $PY -m pytest -p no:cacheprovider -m gpu -ra --durations=10 tests/test_kernels_gpu.py \
   > "$OUT/tests-triton.log" 2>&1; echo "rc=$?" >> "$OUT/tests-triton.log") &
# The Mosaic tests take about 25 s each (compiles): two groups side by side.
(timeout 560 $PY -m pytest -p no:cacheprovider -m gpu -ra --durations=10 \
   tests/test_kernels_mosaic_gpu.py -k "block_128 or persistent" \
   > "$OUT/tests-mosaic-128.log" 2>&1; echo "rc=$?" >> "$OUT/tests-mosaic-128.log") &
(timeout 560 $PY -m pytest -p no:cacheprovider -m "gpu or not gpu" -ra --durations=10 \
   tests/test_kernels_mosaic_gpu.py tests/test_backend_contract.py tests/test_dispatch.py \
   -k "not (block_128_within or block_128_pipeline or persistent)" \
   > "$OUT/tests-mosaic.log" 2>&1; echo "rc=$?" >> "$OUT/tests-mosaic.log") &
(for c in "mosaic.py --shapes flux-1024 --out $OUT/mosaic.json" \
          "probe_exact.py --shape flux-1024 --selection" \
          "profile_op.py --shapes flux-1024 --calls 3"; do
   echo "== $c"; timeout 170 $PY benchmarks/$c; echo "rc=$?"; done > "$OUT/bench1.log" 2>&1) &
(for c in "attention.py --shapes flux-1024 --densities 0.15 --out $OUT/attention" \
          "wan.py --tiny --reps 1 --no-diffusers --layers 2 --out /tmp/wan-smoke" \
          "pipeline.py --tiny --out /tmp/pipeline-smoke.json"; do
   echo "== $c"; timeout 200 $PY benchmarks/$c; echo "rc=$?"; done > "$OUT/bench2.log" 2>&1) &
wait
tail -n 3 "$OUT"/tests-*.log; grep -h "rc=\|Mosaic rows" "$OUT"/bench*.log; cat "$OUT/device.txt"
