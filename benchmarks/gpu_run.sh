#!/usr/bin/env bash
# One device call: GPU-only tests, then the benchmarks; results land in benchmarks/results and $OUT.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"
python3 -m pytest -q -x tests/test_grouped.py tests/test_bias.py tests/test_governance_lens.py tests/test_ops_optimizer.py \
  tests/test_telemetry_io.py tests/test_layers.py tests/test_coherence.py -k "cuda or sync or grouped or masked" 2>&1 | tail -15
python3 benchmarks/bench_observe.py --device cuda --repeats 30 2>&1 | tee "$OUT/observe.log" | tail -20
cp benchmarks/results/observe_cuda.* "$OUT/" 2>/dev/null
python3 benchmarks/bench_edit.py --device cuda "$@" 2>&1 | tee "$OUT/edit.log" | tail -20
cp benchmarks/results/edit_cuda.* "$OUT/" 2>/dev/null
