#!/usr/bin/env bash
# Download the wheels that the GPU machine's image lacks into .whl/ (ignored
# by git), for its Python 3.12: Keras, KerasHub and what they import that the
# image does not hold. TensorFlow is not among them (600 MB; keras_gemma and
# KerasHub import without it), so the GPU check covers JAX and PyTorch.
# Run here, then on the machine: benchmarks/gpu/check.sh (see its header).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
mkdir -p .whl
exclude=$(git rev-parse --git-path info/exclude)
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
platforms=""
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=" --platform ${tag}_x86_64"
done
# Versions as in constraints.txt; optree/namex/kagglehub/kagglesdk are
# imported by keras / keras_hub at import time.
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp $platforms -d .whl \
    keras==3.15.1 keras-hub==0.32.0 namex==0.1.0 optree==0.20.0 \
    kagglehub==1.0.2 kagglesdk==0.1.28 gguf==0.19.0
ls -la .whl
du -sh .whl
