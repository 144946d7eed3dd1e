import keras
import numpy as np
from keras import ops

from keras_gemma.layers.dense import config_or_weight_only
from keras_gemma.layers.dense import decodes_int8_in_place
from keras_gemma.layers.dense import einsum
from keras_gemma.layers.dense import is_one_row
from keras_gemma.layers.dense import one_row_product_in_place
from keras_gemma.layers.dense import torch_decodes_in_place
from keras_gemma.layers.direct_call import DirectCall


@keras.saving.register_keras_serializable(package="keras_gemma")
class EmbeddingScale(DirectCall, keras.layers.Layer):
    """Multiplies token embeddings by `sqrt(hidden_dim)`.

    The constant is rounded to the compute dtype before the multiply (bf16:
    sqrt(2048) -> 45.25), as in the reference models. It is a layer rather
    than an op in the functional graph because Keras 3.15 marks the product
    of a symbolic tensor and a scalar as sparse, which breaks later layers;
    it has no weights, so the weight file layout stays KerasHub's.
    """

    def __init__(self, hidden_dim, **kwargs):
        super().__init__(**kwargs)
        self.hidden_dim = hidden_dim

    def call(self, x):
        return x * ops.cast(self.hidden_dim**0.5, x.dtype)

    def get_config(self):
        return {**super().get_config(), "hidden_dim": self.hidden_dim}


@keras.saving.register_keras_serializable(package="keras_gemma")
class ReversibleEmbedding(DirectCall, keras.layers.ReversibleEmbedding):
    """Keras' `ReversibleEmbedding` (tied weights) whose reverse pass
    (hidden states -> vocabulary logits) contracts the `[vocabulary,
    hidden]` table directly instead of transposing it first: XLA on CPU
    materializes or reads the transposed table slowly, and it is the
    largest matrix read at every decoding step. (PyTorch multiplies by the
    transposed view, a strided BLAS call.) Same weights and outputs.

    It keeps Keras' class name on purpose: weight files locate a layer's
    variables by its class name, so KerasHub files load unchanged.
    """

    def __init__(self, *args, tie_weights=True, **kwargs):
        if not tie_weights:  # Every Gemma ties them; the reverse pass assumes it.
            raise ValueError("keras_gemma's ReversibleEmbedding needs tie_weights=True.")
        super().__init__(*args, tie_weights=True, **kwargs)

    def quantize(self, mode=None, type_check=True, config=None):
        caller_config = config
        if mode == "int8" and config is not None and config.weight_quantizer is None:
            # Keras' default weight quantizer, block by block (see below).
            config = keras.quantizers.Int8QuantizationConfig(
                weight_quantizer=RowBlockAbsMaxQuantizer(axis=-1),
                activation_quantizer=config.activation_quantizer,
            )
        # Keras quantizes only layers whose type is exactly its own.
        super().quantize(mode, type_check=False, config=config)
        self.quantization_config = caller_config  # What get_config saves.

    def quantized_build(self, embeddings_shape, mode, config=None):
        config = config_or_weight_only(mode, config, self.path)
        super().quantized_build(embeddings_shape, mode, config)
        self.quantization_config = self.quantization_config or config

    def load_own_variables(self, store):
        if self.quantization_mode is not None or self.lora_enabled or not self.built:
            return super().load_own_variables(store)
        self._check_load_own_variables(store)
        assign_by_row_blocks(self._embeddings, store["0"])

    def _int8_call(self, inputs, reverse=False):
        one_row = reverse and is_one_row(inputs, range(inputs.ndim - 1))
        if not decodes_int8_in_place(self, one_row):
            return super()._int8_call(inputs, reverse=reverse)
        # See `one_row_product_in_place`; the table is `[vocabulary, hidden]`.
        logits = one_row_product_in_place("...d,vd->...v", inputs, self._embeddings)
        return self._soft_capped(ops.divide(logits, self.embeddings_scale))

    def call(self, inputs, reverse=False):
        if not reverse or self.quantization_mode is not None:
            return super().call(inputs, reverse=reverse)
        dtype = self.reverse_dtype or inputs.dtype
        inputs, table = ops.cast(inputs, dtype), ops.cast(self.embeddings, dtype)
        one_row = is_one_row(inputs, range(inputs.ndim - 1))
        if one_row and keras.config.backend() == "tensorflow":
            # `table @ x`: the table read row by row in one BLAS call. As
            # `x @ table.T` TensorFlow's XLA fuses the transpose into a
            # naive loop. (JAX's XLA reads the table in place either way.)
            logits = ops.matmul(table, ops.reshape(inputs, (-1, 1)))
            logits = ops.reshape(logits, (*inputs.shape[:-1], -1))
        elif one_row and torch_decodes_in_place():
            logits = one_row_product_in_place("...d,vd->...v", inputs, table)
        elif keras.config.backend() == "torch":
            # A BLAS call on the transposed view; Inductor would lower the
            # einsum's one-row batched matmul to slow loops on CPU.
            logits = ops.matmul(inputs, ops.transpose(table))
        else:
            logits = einsum("...d,vd->...v", inputs, table)
        return self._soft_capped(ops.cast(logits, self._logits_dtype(inputs.dtype)))

    def _logits_dtype(self, inputs_dtype):
        """Float32 under a mixed policy, as Keras' layer gives (it multiplies
        by the float32 table; here the product stays in the compute dtype):
        bfloat16 logits round ids above 256 in Keras' accuracy metrics."""
        return self.reverse_dtype or keras.backend.result_type(inputs_dtype, self.variable_dtype)

    def compute_output_spec(self, inputs, reverse=False):
        spec = super().compute_output_spec(inputs, reverse=reverse)
        if reverse and self.quantization_mode is None:  # Keras states the compute dtype.
            spec = keras.KerasTensor(spec.shape, dtype=self._logits_dtype(inputs.dtype))
        return spec

    def _soft_capped(self, logits):
        if self.logit_soft_cap is not None:
            cap = self.logit_soft_cap
            logits = ops.tanh(logits / cap) * cap
        return logits


class RowBlockAbsMaxQuantizer(keras.quantizers.AbsMaxQuantizer):
    """Keras' `AbsMaxQuantizer` (one scale per row of a 2-D weight), applied
    to blocks of rows: the same values, with NumPy temporaries the size of
    one block. Keras' whole-table NumPy pass holds about four float copies
    of the table at once: quantizing gemma3_270m's 671 MB embedding table
    raised the process's peak memory by ~1.4 GB (for Gemma 2B's 2 GB table
    that would be several GB)."""

    rows_per_block = 16384

    def __call__(self, x, axis=None, to_numpy=False):
        axis = self.axis if axis is None else axis
        if len(x.shape) != 2 or tuple(np.atleast_1d(axis)) not in ((-1,), (1,)) or not to_numpy:
            return super().__call__(x, axis=axis, to_numpy=to_numpy)
        rows = x.shape[0]
        values = np.empty(x.shape, self.output_dtype)
        scales = []
        for start in range(0, rows, self.rows_per_block):
            block = x[start : start + self.rows_per_block]
            block_values, block_scale = super().__call__(block, axis=-1, to_numpy=True)
            values[start : start + self.rows_per_block] = ops.convert_to_numpy(block_values)
            scales.append(block_scale)
        return ops.convert_to_tensor(values), ops.concatenate(scales, axis=0)


def assign_by_row_blocks(variable, array, rows=8192):
    """`variable.assign(array)` without Keras' full-size temporaries.

    On PyTorch and TensorFlow, Keras' `assign` converts the whole array
    first (a copy of it), which for the embedding table of a Gemma is
    gigabytes on top of the model. Here the array is converted and written
    into the variable a block of rows at a time. (JAX replaces the
    variable's buffer; its `assign` is kept.)
    """
    backend = keras.config.backend()
    if backend == "jax" or tuple(array.shape) != tuple(variable.shape):
        return variable.assign(array)  # Keras' assign, and its shape error.
    for start in range(0, array.shape[0], rows):
        end = min(start + rows, array.shape[0])
        block = ops.convert_to_tensor(array[start:end], dtype=variable.dtype)
        if backend == "torch":
            import torch

            with torch.no_grad():
                variable.value[start:end].copy_(block)
        else:
            import tensorflow as tf

            # In place on the variable's buffer: `value[start:end].assign`
            # reads the variable first, and the read makes TensorFlow copy
            # the whole buffer on write (and keep both).
            tf.raw_ops.ResourceStridedSliceAssign(
                ref=variable.value.handle, begin=[start], end=[end], strides=[1], value=block
            )
