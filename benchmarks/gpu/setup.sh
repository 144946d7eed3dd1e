# Sourced by check.sh and verify.sh in the repository root, with $log set:
# the wheels the machine's image lacks (where Keras is missing: not on a
# CPU dry run), keras_gemma.presets, and the environment of every step.
if ! python3 -c "import keras" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl >>"$log" 2>&1 || { echo "wheel install failed"; tail "$log"; exit 1; }
fi
# keras_gemma.presets is the repo's presets/ (setup.cfg maps it when installed).
if [ ! -e keras_gemma/presets ]; then
    ln -s ../presets keras_gemma/presets && trap 'rm -f keras_gemma/presets' EXIT
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # Peak memory = what the model needs.
