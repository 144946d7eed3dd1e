"""The default training loss of `GemmaCausalLM`: next-token cross-entropy
from the logits, as Keras' `SparseCategoricalCrossentropy(from_logits=True)`
computes it, with a leaner gradient on JAX.

Gemma's vocabulary makes the logits the biggest tensors of a training step
(gemma3_270m, batch 4 x 256: 262144 logits per token, 1 GiB in float32).
For Keras' loss and its gradient, JAX's XLA keeps three logits-sized
buffers; here the forward pass keeps only the log-sum-exp per token, and
the gradient `softmax - one_hot` is one elementwise pass over the logits:
two buffers (the logits and the gradient). Measured with
`benchmarks/lora_memory.py` (gemma3_270m, LoRA, batch 4 x 256): JAX's
training peak 7.03 -> 6.00 GiB in float32, 5.75 -> 4.93 in bfloat16.

With LoRA (a frozen embedding table) on JAX and TensorFlow,
`GemmaCausalLM` goes further and computes this loss from the final hidden
states, in chunks of tokens (`hidden_state_loss`): no logits-sized buffer
at all (gemma3_270m, same batch: JAX 6.00 -> 4.54 GiB, TensorFlow 6.27 ->
4.74 in float32). Tokens weighted 0 (padding, instruction data's prompts)
are moved behind the others and chunks of them only are skipped: the
vocabulary projection, most of gemma3_270m's training step, is computed
for the tokens that count (30% of 4 x 256 tokens weighted: JAX 7.8 -> 5.8
s per step, TensorFlow 6.9 -> 4.6 on this 2-core CPU).

From the logits, the other backends keep Keras' loss: TensorFlow's kernel
already computes the gradient with the loss (in graph mode, where
TensorFlow runs a 16-bit `fit()` on a CPU, this gradient's separate steps
each take a buffer: +1 GiB), and PyTorch's compiled step fuses it (its peak
is below JAX's). PyTorch has no chunked path: tried (an `autograd.Function`
whose Python loop `torch.compile` unrolls, `torch.func.vjp` per chunk), it
lowered the float32 peak by 0.2 GiB but raised bfloat16's by 0.6 and
int8's by 3.2 (each unrolled chunk dequantized the table).
"""

import keras
from keras import ops
from keras.src.losses.loss import reduce_weighted_values
from keras.src.losses.loss import squeeze_or_expand_to_same_rank

# Logits (tokens x vocabulary) computed at once from the hidden states:
# 256 MB in float32, 256 tokens of Gemma 3.
DEFAULT_LOGITS_PER_CHUNK = 2**26


@keras.saving.register_keras_serializable(package="keras_gemma")
class TokenCrossentropy(keras.losses.Loss):
    """Per-token cross-entropy of integer labels against logits. Reduction
    and sample weights as in every Keras loss (the default divides the
    weighted sum by the number of tokens, as Keras'
    `SparseCategoricalCrossentropy` does). Keras converts the logits to the
    loss's dtype (float32) first. On JAX, a label outside the vocabulary
    (e.g. -100) counts as Keras counts it there: no loss, no gradient; and
    only reverse-mode differentiation is defined (`jax.grad`, not
    `jax.jvp`). `logits_per_chunk` (tokens x vocabulary computed at once)
    sizes the chunks of `hidden_state_loss`; `None` turns that path off."""

    def __init__(
        self, name="token_crossentropy", reduction="sum_over_batch_size",
        logits_per_chunk=DEFAULT_LOGITS_PER_CHUNK, **kwargs
    ):
        super().__init__(name=name, reduction=reduction, **kwargs)
        self.logits_per_chunk = logits_per_chunk

    def call(self, y_true, y_pred):
        if keras.config.backend() != "jax":
            return keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)
        return _with_lean_gradient(_labels(y_true, y_pred.shape))(y_pred)

    def get_config(self):
        return {**super().get_config(), "logits_per_chunk": self.logits_per_chunk}


@keras.saving.register_keras_serializable(package="keras_gemma")
class TokenAccuracy(keras.metrics.SparseCategoricalAccuracy):
    """Keras' `SparseCategoricalAccuracy` (same name) comparing token ids
    exactly: Keras converts the labels and the predicted ids to the logits'
    dtype first, so with bfloat16 logits ids above 256 round (those above
    131072 to multiples of 1024) and different tokens count as a match.
    `GemmaCausalLM`'s default metric."""

    def __init__(self, name="sparse_categorical_accuracy", dtype=None):
        super().__init__(name=name, dtype=dtype)

    def update_state(self, y_true, y_pred, sample_weight=None):
        predictions = ops.cast(ops.argmax(y_pred, axis=-1), "int32")
        count_predictions(self, y_true, predictions, sample_weight)


# The metrics that `count_predictions` may update instead of their own
# `update_state` (a subclass may count differently).
ACCURACIES = (keras.metrics.SparseCategoricalAccuracy, TokenAccuracy)


def logits_per_chunk_of(loss):
    """How many logits (tokens x vocabulary) `hidden_state_loss` may
    compute at once for `loss`, or None where the loss needs all the logits:
    `TokenCrossentropy` (its `logits_per_chunk`) and Keras'
    `SparseCategoricalCrossentropy(from_logits=True)` (KerasHub's LoRA
    guides compile with it) are per-token cross-entropies, with a float32
    result (another dtype would round the labels)."""
    if getattr(loss, "dtype", None) != "float32":
        return None
    if isinstance(loss, TokenCrossentropy):
        return loss.logits_per_chunk
    keras_loss_from_logits = {"from_logits": True, "ignore_class": None, "axis": -1}
    if type(loss) is keras.losses.SparseCategoricalCrossentropy and loss._fn_kwargs == keras_loss_from_logits:
        return DEFAULT_LOGITS_PER_CHUNK
    return None


def hidden_state_loss(loss, y_true, hidden_states, logits_fn, vocabulary_size, sample_weight=None):
    """The value of `loss` (a cross-entropy `logits_per_chunk_of` accepts,
    reduced as its `__call__` reduces) of the logits `logits_fn(hidden_states)`,
    and their greedy predictions, computing the logits in chunks and never
    all at once (`token_losses_from_hidden_states`). Each chunk's gradient
    with respect to its hidden states is computed with its loss, so the
    backward pass keeps no logits: `logits_fn` must not depend on anything
    trainable. A label outside the vocabulary gives no loss and no gradient
    (Keras' TensorFlow kernel rejects it, on a CPU)."""
    labels = _labels(y_true, hidden_states.shape)
    if sample_weight is not None:
        # A token weighted 0 needs no logits: its label is made invalid, and
        # chunks of such tokens only are skipped (padding, instruction
        # data's prompts).
        labels, weight = squeeze_or_expand_to_same_rank(labels, ops.convert_to_tensor(sample_weight))
        labels = ops.where(ops.not_equal(weight, 0), labels, -1)
    losses, predictions = token_losses_from_hidden_states(
        labels, hidden_states, logits_fn, vocabulary_size, logits_per_chunk_of(loss)
    )
    value = reduce_weighted_values(losses, sample_weight=sample_weight, reduction=loss.reduction, dtype=loss.dtype)
    return value, predictions


def count_predictions(accuracy, y_true, predictions, sample_weight=None):
    """Update one of the `ACCURACIES` from greedy predictions made elsewhere
    (`hidden_state_loss`'s) instead of from logits: the values of
    `TokenAccuracy` (Keras' own metric differs with 16-bit logits, see
    there)."""
    labels = ops.reshape(ops.cast(y_true, "int32"), ops.shape(predictions))
    matches = ops.cast(ops.equal(labels, predictions), accuracy.dtype)
    keras.metrics.Mean.update_state(accuracy, matches, sample_weight=sample_weight)


def _labels(y_true, logits_shape):
    labels = ops.cast(y_true, "int32")
    if len(labels.shape) == len(logits_shape):  # [..., 1] labels, as Keras allows.
        labels = ops.squeeze(labels, axis=-1)
    return labels


def token_losses_from_hidden_states(labels, hidden_states, logits_fn, vocabulary_size, logits_per_chunk):
    """Per-token cross-entropy (float32, 0 for labels outside the
    vocabulary) and greedy predictions (int32; 0 for some tokens whose label
    is outside the vocabulary), both shaped as `labels`, of
    `logits_fn(hidden_states)`, computed `logits_per_chunk // vocabulary_size`
    tokens at a time (JAX and TensorFlow). The forward pass also computes
    each token's gradient with respect to its hidden state (one hidden-sized
    residual); the backward pass scales it by the incoming per-token
    gradient. The logits never exist all at once: gemma3_270m at 1024
    tokens x 262144 holds 256 MB of them instead of 1 GiB per logits-sized
    buffer. The tokens with a label in the vocabulary are put first, and
    chunks without any are skipped: their logits are not computed."""
    chunk = max(1, logits_per_chunk // vocabulary_size)
    backend = keras.config.backend()
    if backend == "jax":
        return _jax_chunked_losses(labels, hidden_states, logits_fn, vocabulary_size, chunk)
    if backend == "tensorflow":
        return _tensorflow_chunked_losses(labels, hidden_states, logits_fn, vocabulary_size, chunk)
    raise NotImplementedError(f"No loss from hidden states on the {backend} backend.")


def _jax_chunked_losses(labels, hidden_states, logits_fn, vocabulary_size, chunk):
    """A `lax.scan` over the chunks under a `jax.custom_vjp`."""
    import jax
    import jax.numpy as jnp

    shape = labels.shape
    width = hidden_states.shape[-1]
    flat_hidden = jnp.reshape(hidden_states, (-1, width))
    flat_labels = jnp.reshape(labels, (-1,))
    tokens = flat_labels.shape[0]
    chunk = min(tokens, chunk)
    padding = -tokens % chunk  # Padded tokens get label -1: no loss, no gradient.
    flat_hidden = jnp.pad(flat_hidden, ((0, padding), (0, 0)))
    flat_labels = jnp.pad(flat_labels, (0, padding), constant_values=-1)
    is_valid = jnp.logical_and(flat_labels >= 0, flat_labels < vocabulary_size)
    order = jnp.argsort(jnp.logical_not(is_valid).astype("int32"), stable=True)  # Valid first.
    unsorted = jnp.argsort(order)
    chunks_to_compute = -(-jnp.sum(is_valid.astype("int32")) // chunk)

    def chunk_losses(hidden, labels):
        logits = ops.cast(logits_fn(hidden), "float32")
        return _token_losses(logits, labels)[0], jnp.argmax(logits, axis=-1).astype("int32")

    def computed(hidden, labels):
        losses, pullback, predictions = jax.vjp(lambda h: chunk_losses(h, labels), hidden, has_aux=True)
        (d_hidden,) = pullback(jnp.ones_like(losses))
        return losses, predictions, d_hidden

    def skipped(hidden, labels):
        return jnp.zeros(labels.shape, "float32"), jnp.zeros(labels.shape, "int32"), jnp.zeros_like(hidden)

    def forward(hidden):
        def step(carry, chunk_inputs):
            index, hidden, labels = chunk_inputs
            return carry, jax.lax.cond(index < chunks_to_compute, computed, skipped, hidden, labels)

        chunks = (
            jnp.arange(flat_labels.shape[0] // chunk),
            jnp.reshape(hidden[order], (-1, chunk, width)),
            jnp.reshape(flat_labels[order], (-1, chunk)),
        )
        _, (losses, predictions, d_hidden) = jax.lax.scan(step, None, chunks)
        outputs = (jnp.reshape(losses, (-1,))[unsorted], jnp.reshape(predictions, (-1,))[unsorted])
        return outputs, jnp.reshape(d_hidden, (-1, width))[unsorted]

    def backward(d_hidden, cotangents):
        d_losses = cotangents[0]
        return ((d_losses[:, None] * d_hidden).astype(d_hidden.dtype),)

    @jax.custom_vjp
    def losses_and_predictions(hidden):
        return forward(hidden)[0]

    losses_and_predictions.defvjp(forward, backward)
    losses, predictions = losses_and_predictions(flat_hidden)
    return jnp.reshape(losses[:tokens], shape), jnp.reshape(predictions[:tokens], shape)


def _tensorflow_chunked_losses(labels, hidden_states, logits_fn, vocabulary_size, chunk):
    """A `tf.map_fn` over the chunks (one at a time) under a
    `tf.custom_gradient`; each chunk's gradient from its own `GradientTape`.
    The batch size may be unknown while tracing: the chunking is computed
    from the run-time shapes (XLA compiles it per shape)."""
    import tensorflow as tf

    width = hidden_states.shape[-1]
    flat_hidden = tf.reshape(hidden_states, (-1, width))
    flat_labels = tf.reshape(labels, (-1,))
    tokens = tf.shape(flat_labels)[0]
    chunk = tf.maximum(tf.minimum(tokens, chunk), 1)
    padding = -tokens % chunk  # Padded tokens get label -1: no loss, no gradient.
    flat_hidden = tf.pad(flat_hidden, [[0, padding], [0, 0]])
    flat_labels = tf.pad(flat_labels, [[0, padding]], constant_values=-1)
    is_valid = tf.logical_and(flat_labels >= 0, flat_labels < vocabulary_size)
    order = tf.argsort(tf.cast(tf.logical_not(is_valid), "int32"), stable=True)  # Valid first.
    unsorted = tf.argsort(order)
    chunks_to_compute = -(-tf.reduce_sum(tf.cast(is_valid, "int32")) // chunk)

    def computed(hidden, labels):
        is_valid = tf.logical_and(labels >= 0, labels < vocabulary_size)
        with tf.GradientTape() as tape:
            tape.watch(hidden)
            logits = tf.cast(logits_fn(hidden), "float32")
            # TensorFlow's kernel computes the gradient with the loss (one
            # buffer fewer than `_token_losses`'); it rejects invalid labels.
            losses = tf.nn.sparse_softmax_cross_entropy_with_logits(tf.where(is_valid, labels, 0), logits)
            losses = tf.where(is_valid, losses, 0.0)
        d_hidden = tape.gradient(losses, hidden)
        return losses, tf.argmax(logits, axis=-1, output_type="int32"), d_hidden

    def chunk_losses(inputs):
        index, hidden, labels = inputs
        return tf.cond(
            index < chunks_to_compute,
            lambda: computed(hidden, labels),
            lambda: (tf.zeros(tf.shape(labels)), tf.zeros(tf.shape(labels), "int32"), tf.zeros_like(hidden)),
        )

    @tf.custom_gradient
    def losses_and_predictions(hidden):
        # Not recorded by the outer tape (eager `fit()` would keep each
        # chunk's logits); the chunks' own tapes watch their inputs.
        hidden = tf.stop_gradient(hidden)
        chunks = (
            tf.range(tf.shape(flat_labels)[0] // chunk),
            tf.reshape(tf.gather(hidden, order), (-1, chunk, width)),
            tf.reshape(tf.gather(flat_labels, order), (-1, chunk)),
        )
        losses, predictions, d_hidden = tf.map_fn(
            chunk_losses, chunks,
            fn_output_signature=("float32", "int32", hidden.dtype),
            parallel_iterations=1,  # One chunk's logits at a time.
        )
        d_hidden = tf.gather(tf.reshape(d_hidden, (-1, width)), unsorted)

        def grad(d_losses, d_predictions, variables=None):
            d_hidden_states = tf.cast(d_losses, d_hidden.dtype)[:, None] * d_hidden
            # The logits' weights (frozen: LoRA) get no gradient.
            return (d_hidden_states, [None] * len(variables)) if variables else d_hidden_states

        outputs = (tf.gather(tf.reshape(losses, (-1,)), unsorted), tf.gather(tf.reshape(predictions, (-1,)), unsorted))
        return outputs, grad

    losses, predictions = losses_and_predictions(flat_hidden)
    shape = tf.shape(labels)
    return tf.reshape(losses[:tokens], shape), tf.reshape(predictions[:tokens], shape)


def _token_losses(logits, labels):
    """Each token's cross-entropy (0 for a label outside the vocabulary),
    the log-sum-exp of its logits, and whether its label is valid."""
    is_valid = ops.logical_and(labels >= 0, labels < ops.shape(logits)[-1])
    log_sum_exp = ops.logsumexp(logits, axis=-1)
    label_logits = ops.take_along_axis(logits, ops.where(is_valid, labels, 0)[..., None], axis=-1)[..., 0]
    return ops.where(is_valid, log_sum_exp - label_logits, 0.0), log_sum_exp, is_valid


def _with_lean_gradient(labels):
    @ops.custom_gradient
    def crossentropy(logits):
        vocabulary_size = ops.shape(logits)[-1]
        loss, log_sum_exp, is_valid = _token_losses(logits, labels)

        def grad(*args, upstream=None):
            upstream = args[0] if upstream is None else upstream
            # d loss / d logits = softmax(logits) - one_hot(label), in one
            # elementwise pass over the logits.
            vocabulary = ops.arange(vocabulary_size, dtype="int32")
            is_label = ops.cast(ops.equal(vocabulary, labels[..., None]), logits.dtype)
            softmax = ops.exp(logits - log_sum_exp[..., None])
            scale = ops.where(is_valid, upstream, 0.0)[..., None]
            return (softmax - is_label) * ops.cast(scale, logits.dtype)

        return loss, grad

    return crossentropy
