import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# torch.compile costs tens of seconds per new model on these CPUs, and the
# suite builds hundreds: generate() stays eager on PyTorch except in
# tests/test_generation.py, which proves the compiled path gives the same
# tokens.
os.environ.setdefault("KERAS_GEMMA_TORCH_COMPILE", "0")
# Likewise XLA on TensorFlow: each new tiny model's first generate() took
# 7.5 s with XLA, 3 s as a TensorFlow graph (2-core CPU, under load); with
# this and session 30's other cuts the TensorFlow run took 24 min, not 32.
# The files that prove the XLA path (generation, compiled training, the
# real model, the guides) turn it back on.
os.environ.setdefault("KERAS_GEMMA_TF_XLA", "0")

import keras  # noqa: E402
import pytest  # noqa: E402

from keras_gemma.devices import computes_on_gpu  # noqa: E402
from tests import helpers  # noqa: E402

if keras.config.backend() == "jax" and computes_on_gpu():
    import jax

    # The tests compare float32 products at ~1e-5; JAX's default on a GPU
    # multiplies float32 as TensorFloat-32 (~1e-3).
    jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def compiled_paths(monkeypatch):
    """`generate()` and `fit()` compiled as users get them (PyTorch's
    compile and TensorFlow's XLA on), for the files that check those paths."""
    monkeypatch.setenv("KERAS_GEMMA_TORCH_COMPILE", "1")
    monkeypatch.setenv("KERAS_GEMMA_TF_XLA", "1")


@pytest.fixture(scope="session")
def spm_proto():
    return helpers.train_sentencepiece()


@pytest.fixture(scope="session")
def vocabulary_size(spm_proto):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_proto=spm_proto).vocab_size()


@pytest.fixture
def tokenizer(spm_proto):
    import keras_gemma

    return keras_gemma.GemmaTokenizer(proto=spm_proto)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "real_model: uses the real gemma3_270m weights (slow)"
    )


# `make test` shares test files out among processes (pytest-xdist
# --dist loadfile --no-loadscope-reorder) in collection order: a long file
# handed out last ran alone for minutes while the other process idled
# (xdist's own order, most tests first, put the 4 guide runs last). The
# slowest files (minutes each on a 2-core CPU) go first; the rest keep
# their order.
SLOWEST_FILES_FIRST = (
    "test_generation.py", "test_real_model.py", "test_guides.py", "test_lora.py",
    "test_presets.py", "test_cli.py", "test_compiled_training.py", "test_causal_lm.py",
    "test_families.py", "test_token_loss.py", "test_cross_backend.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
