import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_gemma")
class EinsumDense(keras.layers.EinsumDense):
    """Keras' `EinsumDense`, computing `x @ kernel` when the equation is a
    plain matrix product (`"btd,df->btf"`: the feed-forward layers).

    Same weights, LoRA and quantization as Keras' layer. The reason is
    PyTorch: `torch.einsum` always becomes a batched matmul, and Inductor
    lowers a batched matmul with one row (every projection while decoding
    one token) to its own multiply-and-sum loops on CPU, 2-3x slower than
    the BLAS matrix-vector product that `matmul` keeps. On JAX and
    TensorFlow both forms compile to the same dot.

    It keeps Keras' class name on purpose: weight files locate a layer's
    variables by its class name, so KerasHub files load unchanged.
    """

    def quantize(self, mode=None, type_check=True, config=None):
        # Keras quantizes only layers whose type is exactly its own.
        super().quantize(mode, type_check=False, config=config)

    def call(self, inputs, training=None):
        if not _is_matmul(self.equation):
            return super().call(inputs, training=training)
        x = ops.matmul(inputs, self.kernel)
        if self.bias is not None:
            x = ops.add(x, self.bias)
        if self.activation is not None:
            x = self.activation(x)
        return x


def _is_matmul(equation):
    """Whether `equation` is "...d,df->...f": x's last axis contracted with
    the first of a 2-D kernel, nothing else."""
    inputs, output = equation.split("->")
    x, kernel = inputs.split(",")
    return (
        len(kernel) == 2
        and x[:-1] == output[:-1]
        and x[-1] == kernel[0]
        and output[-1] == kernel[1]
        and kernel[0] not in output
    )
