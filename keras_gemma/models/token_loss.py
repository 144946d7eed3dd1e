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

The other backends keep Keras' loss: TensorFlow's kernel already computes
the gradient with the loss (in graph mode, where TensorFlow runs a 16-bit
`fit()` on a CPU, this gradient's separate steps each take a buffer: +1
GiB), and PyTorch's compiled step fuses it (its peak is below JAX's).
"""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_gemma")
class TokenCrossentropy(keras.losses.Loss):
    """Per-token cross-entropy of integer labels against logits. Reduction
    and sample weights as in every Keras loss (the default divides the
    weighted sum by the number of tokens, as Keras'
    `SparseCategoricalCrossentropy` does). Keras converts the logits to the
    loss's dtype (float32) first. On JAX, a label outside the vocabulary
    (e.g. -100) counts as Keras counts it there: no loss, no gradient; and
    only reverse-mode differentiation is defined (`jax.grad`, not
    `jax.jvp`)."""

    def __init__(self, name="token_crossentropy", reduction="sum_over_batch_size", **kwargs):
        super().__init__(name=name, reduction=reduction, **kwargs)

    def call(self, y_true, y_pred):
        if keras.config.backend() != "jax":
            return keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)
        labels = ops.cast(y_true, "int32")
        if len(labels.shape) == len(y_pred.shape):  # [..., 1] labels, as Keras allows.
            labels = ops.squeeze(labels, axis=-1)
        return _with_lean_gradient(labels)(y_pred)


def _with_lean_gradient(labels):
    @ops.custom_gradient
    def crossentropy(logits):
        vocabulary_size = ops.shape(logits)[-1]
        is_valid = ops.logical_and(labels >= 0, labels < vocabulary_size)
        log_sum_exp = ops.logsumexp(logits, axis=-1)
        label_logits = ops.take_along_axis(
            logits, ops.where(is_valid, labels, 0)[..., None], axis=-1
        )[..., 0]
        loss = ops.where(is_valid, log_sum_exp - label_logits, 0.0)

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
