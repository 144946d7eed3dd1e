"""`TokenCrossentropy`, `GemmaCausalLM`'s default loss: Keras' sparse
categorical cross-entropy from logits, with a gradient that keeps fewer
logits-sized buffers."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_gemma
from keras_gemma.models.token_loss import TokenAccuracy
from keras_gemma.models.token_loss import TokenCrossentropy
from keras_gemma.models.token_loss import hidden_state_loss
from keras_gemma.models.token_loss import token_losses_from_hidden_states
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


def test_default_accuracy_compares_token_ids_exactly():
    """With bfloat16 logits Keras' accuracy rounds the labels and the
    predicted ids to bfloat16 (257 -> 256, 100001 -> 99840): tokens next
    to the right one count as right. `TokenAccuracy` (the default) does
    not; with float32 logits both count alike."""
    logits = np.full((1, 3, 100002), -1.0, "float32")
    logits[0, 0, 256] = logits[0, 1, 100000] = logits[0, 2, 7] = 1.0
    labels = np.array([[257, 100001, 7]], "int32")
    results = {}
    for dtype in ("float32", "bfloat16"):
        for metric in (keras.metrics.SparseCategoricalAccuracy(), TokenAccuracy()):
            metric.update_state(labels, ops.cast(logits, dtype))
            results[dtype, type(metric).__name__] = float(metric.result())
    assert results["bfloat16", "SparseCategoricalAccuracy"] == 1.0  # Keras' rounding.
    assert results["bfloat16", "TokenAccuracy"] == pytest.approx(1 / 3)
    assert results["float32", "SparseCategoricalAccuracy"] == results["float32", "TokenAccuracy"] == pytest.approx(1 / 3)
    gemma_lm = keras_gemma.GemmaCausalLM(
        keras_gemma.GemmaBackbone(vocabulary_size=64, **helpers.TINY_MQA), preprocessor=None
    )
    gemma_lm.compile()
    assert [type(m) for m in gemma_lm._compile_metrics._user_weighted_metrics] == [TokenAccuracy]


def test_serializes_its_chunk_size_and_accuracy():
    loss = TokenCrossentropy(logits_per_chunk=1000)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert restored.logits_per_chunk == 1000
    metric = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(TokenAccuracy()))
    assert isinstance(metric, TokenAccuracy) and metric.name == "sparse_categorical_accuracy"


def _only_where_implemented():
    if keras.config.backend() == "torch":
        pytest.skip("PyTorch computes the loss from the logits (see GemmaCausalLM.loss_from_hidden_states)")


@pytest.mark.parametrize("soft_cap", [None, 2.0])
def test_losses_from_hidden_states_equal_the_full_computation(soft_cap):
    """Chunks of 3 tokens over 14 (one chunk padded), a soft-capped head,
    labels outside the vocabulary: the per-token losses, greedy predictions
    (of the tokens with a label in the vocabulary) and the gradient with
    respect to the hidden states equal those of all the logits at once
    (autodiff of a plain log-softmax)."""
    _only_where_implemented()
    hidden, table, labels, weight = random_case()
    labels[0, :2] = [-100, 50]
    variable = keras.Variable(hidden)

    def logits_fn(h):
        logits = ops.matmul(h, table.T)
        return logits if soft_cap is None else soft_cap * ops.tanh(logits / soft_cap)

    def reference():
        log_softmax = ops.log_softmax(logits_fn(variable), axis=-1)
        valid = (labels >= 0) & (labels < 50)
        picked = ops.take_along_axis(log_softmax, np.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
        return ops.where(valid, -picked, 0.0), ops.argmax(log_softmax, axis=-1)

    def chunked():
        return token_losses_from_hidden_states(labels, variable, logits_fn, 50, logits_per_chunk=3 * 50)

    losses, predictions = (ops.convert_to_numpy(x) for x in chunked())
    expected_losses, expected_predictions = (ops.convert_to_numpy(x) for x in reference())
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-6, atol=1e-6)
    in_vocabulary = (labels >= 0) & (labels < 50)
    np.testing.assert_array_equal(predictions[in_vocabulary], expected_predictions[in_vocabulary])
    (gradient,) = helpers.gradients(lambda: ops.sum(chunked()[0] * weight), [variable])
    (expected,) = helpers.gradients(lambda: ops.sum(reference()[0] * weight), [variable])
    assert np.abs(expected).max() > 0.05
    np.testing.assert_allclose(gradient, expected, atol=1e-6)
    assert not gradient[0, :2].any()


def counting_calls(logits_fn, calls):
    """`logits_fn` that appends the number of tokens it computes to `calls`
    each time it runs (not when traced)."""
    if keras.config.backend() != "jax":  # Run eagerly: each call runs.
        return lambda h: calls.append(ops.shape(h)[0]) or logits_fn(h)
    import jax

    def counted(h):
        jax.debug.callback(lambda: calls.append(h.shape[0]))
        return logits_fn(h)

    return counted


def calls_made(calls):
    """`calls`, once JAX's callbacks have all run."""
    if keras.config.backend() == "jax":
        import jax

        jax.effects_barrier()
    return calls


# Labels and weights as Keras takes them: [batch, length] or with a last axis of 1.
@pytest.mark.parametrize("labels_axis, weight_axis", [(False, False), (True, False), (False, True)])
def test_chunks_of_tokens_without_a_loss_are_not_computed(labels_axis, weight_axis):
    """Tokens weighted 0 (padding, instruction data's prompts) need no
    logits: 14 tokens in chunks of 3, 4 of them with a weight, are computed
    in 2 chunks, not 5; the weighted loss of a training step and its
    gradient equal those of all the logits (Keras' loss)."""
    _only_where_implemented()
    hidden, table, labels, _ = random_case()
    weight = np.zeros_like(labels, "float32")
    weight[0, [1, 5]] = 1.0
    weight[1, [0, 6]] = [0.5, 2.0]
    labels = labels[..., None] if labels_axis else labels
    weight = weight[..., None] if weight_axis else weight
    variable = keras.Variable(hidden)
    calls = []
    logits_fn = counting_calls(lambda h: ops.matmul(h, table.T), calls)
    loss = TokenCrossentropy(logits_per_chunk=3 * 50)

    def chunked():
        return hidden_state_loss(loss, labels, variable, logits_fn, 50, sample_weight=weight)[0]

    value = ops.convert_to_numpy(chunked())
    assert calls_made(calls) == [3, 3]
    expected = ops.convert_to_numpy(KERAS_LOSS(labels, ops.matmul(hidden, table.T), sample_weight=weight))
    np.testing.assert_allclose(value, expected, rtol=1e-6)
    (gradient,) = helpers.gradients(chunked, [variable])
    (expected_gradient,) = helpers.gradients(
        lambda: KERAS_LOSS(labels, ops.matmul(variable, table.T), sample_weight=weight), [variable]
    )
    assert np.abs(expected_gradient).max() > 0.01
    np.testing.assert_allclose(gradient, expected_gradient, atol=1e-6)
    # Without weights every chunk is computed.
    calls.clear()
    ops.convert_to_numpy(hidden_state_loss(loss, labels, variable, logits_fn, 50)[0])
    assert calls_made(calls) == [3] * 5


def lora_fit(loss, metrics=None, dtype="float32"):
    """Two epochs of LoRA `fit()` on a random tiny model whose labels are
    half its own greedy predictions (so that the accuracy is not 0):
    the model, its history and its adapters."""
    keras.utils.set_random_seed(0)
    backbone = keras_gemma.GemmaBackbone(vocabulary_size=300, dtype=dtype, **helpers.TINY_MQA)
    gemma_lm = keras_gemma.GemmaCausalLM(backbone, preprocessor=None)
    backbone.enable_lora(rank=2)
    kwargs = {} if metrics is None else {"weighted_metrics": metrics}
    gemma_lm.compile(optimizer=keras.optimizers.Adam(1e-2), loss=loss, **kwargs)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 300, (4, 12)).astype("int32")
    x = {"token_ids": tokens, "padding_mask": np.ones_like(tokens)}
    labels = np.where(rng.random(tokens.shape) > 0.5, ops.convert_to_numpy(ops.argmax(gemma_lm(x), -1)), tokens)
    weight = (rng.random(tokens.shape) > 0.2).astype("float32")
    history = gemma_lm.fit(x, labels, sample_weight=weight, batch_size=2, epochs=2, shuffle=False, verbose=0)
    adapters = [ops.convert_to_numpy(v) for v in gemma_lm.trainable_variables]
    return gemma_lm, history.history, adapters


def keras_loss_and_accuracy():  # New objects per model: a metric keeps its state.
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True), [keras.metrics.SparseCategoricalAccuracy()]


# Keras' loss from logits and accuracy: how KerasHub's LoRA guides compile.
# Mixed precision: the bfloat16 gradients are rounded at other points, so
# the adapters differ in their last bits after a few Adam steps; Keras'
# accuracy compares bfloat16 logits' predictions with labels rounded to
# bfloat16 (ids above 256 of this vocabulary of 300), ours exactly (2 of 40
# tokens differ).
FLOAT32 = dict(rtol=1e-5, accuracy_atol=0, adapters_atol=1e-6)
MIXED = dict(rtol=2e-2, accuracy_atol=0.05, adapters_atol=5e-3)


@pytest.mark.parametrize(
    "loss_and_metrics, dtype, tolerance",
    [
        (lambda: (TokenCrossentropy(logits_per_chunk=300 * 5), None), "float32", FLOAT32),
        (keras_loss_and_accuracy, "float32", FLOAT32),
        (keras_loss_and_accuracy, "mixed_bfloat16", MIXED),
        (lambda: (TokenCrossentropy(logits_per_chunk=300 * 5), None), "mixed_bfloat16", MIXED),
    ],
    ids=["default_in_chunks_of_5", "keras_loss_and_accuracy", "mixed_bfloat16", "mixed_bfloat16_in_chunks_of_5"],
)
def test_lora_fit_from_hidden_states_equals_fit_from_logits(loss_and_metrics, dtype, tolerance):
    _only_where_implemented()
    chunked_lm, chunked, chunked_adapters = lora_fit(*loss_and_metrics(), dtype=dtype)
    # Keras' loss as a function, not its class: the logits path.
    logits_lm, expected, expected_adapters = lora_fit(
        lambda labels, logits: keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy()],
        dtype=dtype,
    )
    assert chunked_lm.loss_from_hidden_states and not logits_lm.loss_from_hidden_states
    assert sorted(chunked) == sorted(expected) == ["loss", "sparse_categorical_accuracy"]
    assert 0 < chunked["sparse_categorical_accuracy"][0] < 1
    rtol = tolerance["rtol"]
    np.testing.assert_allclose(chunked["loss"], expected["loss"], rtol=rtol)
    np.testing.assert_allclose(
        chunked["sparse_categorical_accuracy"], expected["sparse_categorical_accuracy"],
        rtol=rtol, atol=tolerance["accuracy_atol"],
    )
    for value, reference in zip(chunked_adapters, expected_adapters):
        np.testing.assert_allclose(value, reference, rtol=10 * rtol, atol=tolerance["adapters_atol"])
    # Evaluation goes through the logits, with the same metric.
    x = {"token_ids": np.full((2, 5), 7, "int32"), "padding_mask": np.ones((2, 5), "int32")}
    results = chunked_lm.evaluate(x, np.full((2, 5), 9, "int32"), verbose=0, return_dict=True)
    assert sorted(results) == ["loss", "sparse_categorical_accuracy"]


class AccuracyOfFirstTokens(keras.metrics.SparseCategoricalAccuracy):
    def update_state(self, y_true, y_pred, sample_weight=None):
        super().update_state(y_true[:, :2], y_pred[:, :2])


def test_hidden_state_loss_is_used_only_where_it_holds():
    """A trainable embedding table (full fine-tuning), a metric that needs
    the logits, loss weights or a loss that is not a cross-entropy from
    logits keep the logits path; `enable_lora` after `compile` switches to
    the hidden states."""
    gemma_lm = keras_gemma.GemmaCausalLM(
        keras_gemma.GemmaBackbone(vocabulary_size=300, **helpers.TINY_MQA), preprocessor=None
    )
    gemma_lm.compile()
    assert not gemma_lm.loss_from_hidden_states  # The table trains.
    gemma_lm.backbone.enable_lora(rank=2)
    where = keras.config.backend() != "torch"
    assert gemma_lm.loss_from_hidden_states == where
    gemma_lm.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert gemma_lm.loss_from_hidden_states == where
    for logits_needed in (
        dict(weighted_metrics=["sparse_categorical_crossentropy"]),
        dict(metrics=[keras.metrics.SparseCategoricalAccuracy()]),
        dict(loss_weights=2.0),
        dict(loss=TokenCrossentropy(logits_per_chunk=None)),
        dict(loss=keras.losses.SparseCategoricalCrossentropy()),  # From probabilities.
        dict(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=0)),
        dict(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="bfloat16")),
        dict(weighted_metrics=[AccuracyOfFirstTokens()]),  # Its own update_state.
    ):
        gemma_lm.compile(**logits_needed)
        assert not gemma_lm.loss_from_hidden_states, logits_needed


def test_hidden_state_loss_keeps_no_logits_sized_buffer():
    """XLA's temporary memory for a whole LoRA training step, at a size
    where the logits (2 x 64 x 16384, 8 MB) dwarf everything else: from
    the hidden states in chunks of 16 tokens (1 MB of logits), less than
    one logits-sized buffer; from the logits, at least two."""
    if keras.config.backend() != "jax":
        pytest.skip("XLA's buffer sizes are read through JAX")
    import jax

    def train_step_temp_bytes(loss):
        backbone = keras_gemma.GemmaBackbone(vocabulary_size=16384, **helpers.TINY_MQA)
        gemma_lm = keras_gemma.GemmaCausalLM(backbone, preprocessor=None)
        backbone.enable_lora(rank=2)
        gemma_lm.compile(optimizer="adam", loss=loss)
        tokens = np.ones((2, 64), "int32")
        data = ({"token_ids": tokens, "padding_mask": tokens}, tokens, tokens.astype("float32"))
        gemma_lm.train_on_batch(*data)  # Builds the optimizer and the metrics.
        state = tuple(
            [v.value for v in variables]
            for variables in (
                gemma_lm.trainable_variables, gemma_lm.non_trainable_variables,
                gemma_lm.optimizer.variables, gemma_lm.metrics_variables,
            )
        )
        compiled = jax.jit(gemma_lm.train_step).lower(state, data).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    logits_bytes = 2 * 64 * 16384 * 4
    assert train_step_temp_bytes(TokenCrossentropy(logits_per_chunk=None)) >= 2 * logits_bytes
    assert train_step_temp_bytes(TokenCrossentropy(logits_per_chunk=16 * 16384)) < logits_bytes
