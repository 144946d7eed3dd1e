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
    """Per-token cross-entropy of integer labels against logits (any float
    dtype; computed in float32). Reduction and sample weights as in every
    Keras loss (the default divides the weighted sum by the number of
    tokens, as Keras' `SparseCategoricalCrossentropy` does)."""

    def __init__(self, name="token_crossentropy", reduction="sum_over_batch_size", **kwargs):
        super().__init__(name=name, reduction=reduction, **kwargs)

    def call(self, y_true, y_pred):
        if keras.config.backend() != "jax":
            return keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)
        return _with_lean_gradient(ops.cast(y_true, "int32"))(y_pred)


def _token_crossentropy(labels, logits):
    """(-log softmax(logits)[label], log-sum-exp) per token, in float32."""
    logits = ops.cast(logits, "float32")
    log_sum_exp = ops.logsumexp(logits, axis=-1)
    label_logits = ops.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    return log_sum_exp - label_logits, log_sum_exp


def _with_lean_gradient(labels):
    @ops.custom_gradient
    def crossentropy(logits):
        loss, log_sum_exp = _token_crossentropy(labels, logits)

        def grad(*args, upstream=None):
            upstream = args[0] if upstream is None else upstream
            # d loss / d logits = softmax(logits) - one_hot(label), in one
            # elementwise pass over the logits.
            logits32 = ops.cast(logits, "float32")
            vocabulary = ops.arange(ops.shape(logits)[-1], dtype="int32")
            is_label = ops.cast(ops.equal(vocabulary, labels[..., None]), "float32")
            softmax = ops.exp(logits32 - log_sum_exp[..., None])
            return ops.cast((softmax - is_label) * upstream[..., None], logits.dtype)

        return loss, grad

    return crossentropy
