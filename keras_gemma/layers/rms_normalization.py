import keras
from keras import ops

from keras_gemma.layers.direct_call import DirectCall


@keras.saving.register_keras_serializable(package="keras_gemma")
class RMSNormalization(DirectCall, keras.layers.Layer):
    """Gemma's RMSNorm: `x * rsqrt(mean(x^2) + eps) * (1 + scale)`.

    `scale` starts at zero (so the layer starts as plain RMS scaling). The
    statistics are always computed in float32 and the result is cast back to
    the compute dtype after the multiply, as in the reference models.
    """

    def __init__(self, epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def build(self, input_shape):
        self.scale = self.add_weight(
            name="scale", shape=(input_shape[-1],), initializer="zeros"
        )

    def call(self, x):
        x = ops.cast(x, "float32")
        variance = ops.mean(ops.square(x), axis=-1, keepdims=True)
        x = x * ops.rsqrt(variance + self.epsilon)
        x = x * (1.0 + ops.cast(self.scale, "float32"))
        return ops.cast(x, self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}
