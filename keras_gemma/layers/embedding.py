import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_gemma")
class EmbeddingScale(keras.layers.Layer):
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
