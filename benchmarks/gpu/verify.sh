#!/usr/bin/env bash
# A short second GPU check (~4 minutes of a lease, no weight files): JAX's
# decode kernels on random Gemma 2B weights, with `one_row_copies` 2 (the
# default on a GPU) next to 1 (before), then the GPU tests of the one-row
# products and of generation. Device run: "bash benchmarks/gpu/verify.sh",
# carry [".whl"] (benchmarks/gpu/wheels.sh), timeout_s 230.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/keras_gemma_gpu_verify}
mkdir -p "$OUT"
log="$OUT/log.txt"
source benchmarks/gpu/setup.sh
config=${CONFIG:-gemma_2b_en}
dump=/tmp/keras_gemma_hlo traces=/tmp/keras_gemma_traces
XLA_FLAGS="--xla_dump_to=$dump --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*generate.*" \
    KERAS_BACKEND=jax timeout -k 5 ${PROFILE_SECONDS:-120} python3 benchmarks/gpu/profile_decode.py \
    "$traces" --config "$config" --new-tokens 64 --row-copies-variant 1 \
    --xla-variant '{"xla_gpu_enable_cublaslt": true}' 2>>"$OUT/log.txt" | tee "$OUT/profile_jax.txt"
echo "--- profile: exit $?"
(cd "$dump" && tar czf "$OUT/hlo_jax.tar.gz" *after_optimizations.txt) 2>>"$OUT/log.txt"
tar czf "$OUT/traces.tar.gz" -C "$traces" . 2>>"$OUT/log.txt"
KERAS_BACKEND=jax timeout -k 5 ${TESTS_SECONDS:-60} python3 -m pytest -q -p no:cacheprovider \
    tests/test_dense.py tests/test_generation.py -k "one_row or equals_eager or recompile" 2>&1 | tail -4
echo "--- tests jax: exit $?"
KERAS_BACKEND=torch timeout -k 5 ${TORCH_SECONDS:-40} python3 -m pytest -q -p no:cacheprovider \
    tests/test_generation.py -k cuda_graph 2>&1 | tail -4
echo "--- tests torch: exit $?"
