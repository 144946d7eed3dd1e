import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaEmbedding(keras.layers.ReversibleEmbedding):
    """Tied token embedding: `ids -> embeddings * sqrt(output_dim)` forward,
    `hidden -> logits` with `reverse=True` (soft-capped when configured).

    The scale constant is rounded to the compute dtype before the multiply
    (bf16: sqrt(2048) -> 45.25), as in the reference models. It lives in the
    layer (not in the functional graph) because Keras 3.15 marks the product
    of a symbolic tensor and a scalar as sparse, which breaks later layers.
    """

    def call(self, inputs, reverse=False):
        outputs = super().call(inputs, reverse=reverse)
        if reverse:
            return outputs
        return outputs * ops.cast(self.output_dim**0.5, outputs.dtype)
