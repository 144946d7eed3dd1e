"""`TokenCrossentropy`, `GemmaCausalLM`'s default loss: Keras' sparse
categorical cross-entropy from logits, with a gradient that keeps fewer
logits-sized buffers."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_gemma
from keras_gemma.models.token_loss import TokenCrossentropy
from tests import helpers
from tests.test_compiled_training import lora_losses

KERAS_LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def loss_and_gradient(loss, dtype, hidden, table, labels, sample_weight):
    """The loss of `hidden @ table.T` and its gradient with respect to
    `hidden` (a Keras variable of `dtype`), as float32 NumPy."""
    variable = keras.Variable(hidden, dtype=dtype)

    def loss_fn():
        logits = ops.einsum("btd,vd->btv", variable, ops.cast(table, dtype))
        return loss(labels, logits, sample_weight=sample_weight)

    value = ops.convert_to_numpy(ops.cast(loss_fn(), "float32"))
    (gradient,) = helpers.gradients(loss_fn, [variable])
    return value, gradient.astype("float32")


# bfloat16 logits: both losses compute in float32 from the same bfloat16
# values; the gradients round to bfloat16 once either way.
@pytest.mark.parametrize("dtype, atol", [("float32", 1e-6), ("bfloat16", 1e-2)])
def test_equals_keras_sparse_crossentropy_and_its_gradient(dtype, atol):
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(2, 7, 16)).astype("float32")
    table = rng.normal(size=(50, 16)).astype("float32")
    labels = rng.integers(0, 50, (2, 7)).astype("int32")
    sample_weight = (rng.random((2, 7)) > 0.3).astype("float32")
    args = (dtype, hidden, table, labels, sample_weight)
    keras_value, keras_gradient = loss_and_gradient(KERAS_LOSS, *args)
    value, gradient = loss_and_gradient(TokenCrossentropy(), *args)
    np.testing.assert_allclose(value, keras_value, rtol=1e-6)
    assert np.abs(keras_gradient).max() > 0.05  # Not a vanishing gradient.
    np.testing.assert_allclose(gradient, keras_gradient, atol=atol)


def test_is_the_default_loss_and_fits_as_keras_loss_does(monkeypatch):
    monkeypatch.setenv("KERAS_GEMMA_TORCH_COMPILE", "1")  # conftest turns it off.
    gemma_lm = keras_gemma.GemmaCausalLM(
        keras_gemma.GemmaBackbone(vocabulary_size=64, **helpers.TINY_MQA), preprocessor=None
    )
    gemma_lm.compile()
    assert isinstance(gemma_lm.loss, TokenCrossentropy)
    # Compiled fit() (every backend), several Adam steps: the same losses.
    _, with_keras_loss = lora_losses()
    _, default = lora_losses(loss="auto")
    assert default[-1] < default[0]
    np.testing.assert_allclose(default, with_keras_loss, rtol=1e-5)


def test_serializes():
    loss = TokenCrossentropy(reduction="sum")
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert isinstance(restored, TokenCrossentropy)
    assert restored.reduction == "sum"


def test_keeps_one_logits_sized_buffer_fewer_than_keras_loss():
    """XLA's temporary memory for the loss of `hidden @ table.T` and its
    gradient together (as `fit()` computes them), at a size where the
    logits (8 MB) dwarf everything else: Keras' loss keeps three
    logits-sized buffers, ours two."""
    if keras.config.backend() != "jax":
        pytest.skip("XLA's buffer sizes are read through JAX")
    import jax

    hidden = jax.ShapeDtypeStruct((2, 64, 32), "float32")
    table = jax.ShapeDtypeStruct((16384, 32), "float32")
    labels = jax.ShapeDtypeStruct((2, 64), "int32")
    logits_bytes = 2 * 64 * 16384 * 4

    def temp_bytes(loss):
        def loss_of(hidden, table, labels):
            return loss(labels, ops.einsum("btd,vd->btv", hidden, table))

        compiled = jax.jit(jax.value_and_grad(loss_of)).lower(hidden, table, labels).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    keras_bytes, ours = temp_bytes(KERAS_LOSS), temp_bytes(TokenCrossentropy())
    assert keras_bytes >= 3 * logits_bytes
    assert ours < 2.1 * logits_bytes
