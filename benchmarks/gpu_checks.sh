#!/usr/bin/env bash
# The GPU machine's quick checks, on random weights (no checkpoint transfer), results under
# ${OUT:-/tmp/out}: the Triton kernels' tests against their PyTorch references, the kernel
# micro-benchmarks (tree-verify vs decode, gathered + its launch-config sweep) and the sparse
# decode / TriForce profiles with their warnings (a failed CUDA-graph capture warns, then runs
# eagerly).
#   bash benchmarks/gpu_checks.sh            # from the repository root, on the GPU machine
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
export PYTHONPATH=${PYTHONPATH:-}:$PWD
python -m pytest -q -p no:cacheprovider tests/test_triton_decode.py tests/test_fused_selective.py \
  tests/test_kv_select.py tests/test_kv_quant.py tests/test_graphed_verify_cuda.py >"$out/gpu_tests.txt" 2>&1
tail -1 "$out/gpu_tests.txt"; grep FAILED "$out/gpu_tests.txt" | head
timeout 120 python benchmarks/kv_tree.py --out "$out" --name kv_tree 2>&1 | tail -6
timeout 120 python benchmarks/kv_gathered.py --out "$out" --name kv_gathered 2>&1 | tail -4
timeout 150 python benchmarks/sparse_profile.py policies 32000 32 >"$out/profile_policies.txt" 2>&1
grep -E "ms/step|[Ww]arn" "$out/profile_policies.txt" | head -12
timeout 150 python benchmarks/sparse_profile.py triforce 32000 32 >"$out/profile_triforce.txt" 2>&1
grep -E "triforce rep|[Ww]arn" "$out/profile_triforce.txt" | head -12
timeout 200 python benchmarks/kv_gathered_sweep.py >"$out/kv_gathered_sweep.txt" 2>&1
grep -E "^batch|^  " "$out/kv_gathered_sweep.txt" | head -20
