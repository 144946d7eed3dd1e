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


def numpy_loss_and_gradient(hidden, table, labels, sample_weight):
    """Cross-entropy averaged over all tokens (weighted), and its gradient
    `(softmax - one_hot) * weight / tokens @ table`, in float64."""
    logits = hidden.astype("float64") @ table.T.astype("float64")
    shifted = logits - logits.max(-1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_softmax, labels[..., None], axis=-1)[..., 0]
    tokens = labels.size
    value = -(picked * sample_weight).sum() / tokens
    one_hot = np.eye(table.shape[0])[labels]
    d_logits = (np.exp(log_softmax) - one_hot) * (sample_weight / tokens)[..., None]
    return value, d_logits @ table


def random_case(vocabulary_size=50):
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(2, 7, 16)).astype("float32")
    table = rng.normal(size=(vocabulary_size, 16)).astype("float32")
    labels = rng.integers(0, vocabulary_size, (2, 7)).astype("int32")
    sample_weight = (rng.random((2, 7)) > 0.3).astype("float32")
    return hidden, table, labels, sample_weight


# bfloat16: the logits are rounded to bfloat16 before the loss (float32).
@pytest.mark.parametrize("dtype, rtol, atol", [("float32", 1e-5, 1e-6), ("bfloat16", 2e-2, 2e-2)])
def test_value_and_gradient_equal_numpy_and_keras_loss(dtype, rtol, atol):
    case = random_case()
    value, gradient = loss_and_gradient(TokenCrossentropy(), dtype, *case)
    expected_value, expected_gradient = numpy_loss_and_gradient(*case)
    assert np.abs(expected_gradient).max() > 0.05  # Not a vanishing gradient.
    np.testing.assert_allclose(value, expected_value, rtol=rtol)
    np.testing.assert_allclose(gradient, expected_gradient, atol=atol)
    keras_value, keras_gradient = loss_and_gradient(KERAS_LOSS, dtype, *case)
    np.testing.assert_allclose(value, keras_value, rtol=1e-6)
    np.testing.assert_allclose(gradient, keras_gradient, atol=1e-6)


def test_labels_outside_the_vocabulary_count_as_in_keras_loss_on_jax():
    """Keras' JAX loss gives a label outside the vocabulary (-100, as
    Hugging Face pads labels; -1; the vocabulary size) no loss and no
    gradient; TensorFlow's and PyTorch's kernels reject or mis-handle such
    labels in Keras' loss itself, and there ours is Keras'."""
    if keras.config.backend() != "jax":
        pytest.skip("TokenCrossentropy is Keras' loss on this backend")
    hidden, table, labels, _ = random_case()
    labels[0, :3] = [-100, -1, 50]
    sample_weight = np.ones(labels.shape, "float32")
    value, gradient = loss_and_gradient(TokenCrossentropy(), "float32", hidden, table, labels, sample_weight)
    keras_value, keras_gradient = loss_and_gradient(KERAS_LOSS, "float32", hidden, table, labels, sample_weight)
    assert np.isfinite(value)
    np.testing.assert_allclose(value, keras_value, rtol=1e-6)
    np.testing.assert_allclose(gradient, keras_gradient, atol=1e-6)
    assert not gradient[0, :3].any()
    # Labels of shape [..., 1], as Keras accepts them.
    value_1, _ = loss_and_gradient(TokenCrossentropy(), "float32", hidden, table, labels[..., None], sample_weight)
    np.testing.assert_allclose(value_1, value, rtol=1e-6)


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
