import keras
from keras import ops

from keras_gemma.layers.attention import GemmaAttention
from keras_gemma.layers.dense import EinsumDense
from keras_gemma.layers.direct_call import DirectCall
from keras_gemma.layers.rms_normalization import RMSNormalization


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaDecoderBlock(DirectCall, keras.layers.Layer):
    """One transformer block: attention then a GeGLU feed-forward network.

    Gemma 1: `h = x + attn(norm(x)); out = h + mlp(norm(h))`.
    Gemma 2/3 (`use_sandwich_norms`) also normalize each branch's output:
    `h = x + norm(attn(norm(x))); out = h + norm(mlp(norm(h)))`.

    `intermediate_dim` is the width of each of the two gates (Hugging Face's
    `intermediate_size`). `attention_config` holds `GemmaAttention`'s
    arguments (heads, query scale, soft-cap, window, QK-norm, RoPE).
    """

    def __init__(
        self,
        intermediate_dim,
        attention_config,
        use_sandwich_norms=False,
        layer_norm_epsilon=1e-6,
        dropout=0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.intermediate_dim = intermediate_dim
        self.attention_config = dict(attention_config)
        self.use_sandwich_norms = use_sandwich_norms
        self.layer_norm_epsilon = layer_norm_epsilon
        self.dropout = dropout

        # Attribute and layer names follow KerasHub's Gemma layout so that
        # KerasHub weight files load without renaming.
        def norm(name):
            return RMSNormalization(
                layer_norm_epsilon, dtype=self.dtype_policy, name=name
            )

        self.pre_attention_norm = norm("pre_attention_norm")
        self.attention = GemmaAttention(
            **self.attention_config,
            layer_norm_epsilon=layer_norm_epsilon,
            dropout=dropout,
            dtype=self.dtype_policy,
            name="attention",
        )
        self.pre_ffw_norm = norm("pre_ffw_norm")
        if use_sandwich_norms:
            self.post_attention_norm = norm("post_attention_norm")
            self.post_ffw_norm = norm("post_ffw_norm")
        self.gating_ffw = self._dense("btd,df->btf", intermediate_dim, "ffw_gating")
        self.gating_ffw_2 = self._dense(
            "btd,df->btf", intermediate_dim, "ffw_gating_2"
        )
        self.ffw_linear = None  # Built once the hidden size is known.
        self.residual_dropout = keras.layers.Dropout(dropout, dtype=self.dtype_policy)

    def _dense(self, equation, output_dim, name):
        return EinsumDense(
            equation, (None, output_dim), dtype=self.dtype_policy, name=name
        )

    def build(self, input_shape):
        hidden_dim = input_shape[-1]
        self.ffw_linear = self._dense("btf,fd->btd", hidden_dim, "ffw_linear")
        for layer in (self.pre_attention_norm, self.attention, self.pre_ffw_norm):
            layer.build(input_shape)
        if self.use_sandwich_norms:
            self.post_attention_norm.build(input_shape)
            self.post_ffw_norm.build(input_shape)
        self.gating_ffw.build(input_shape)
        self.gating_ffw_2.build(input_shape)
        self.ffw_linear.build((None, None, self.intermediate_dim))

    def call(
        self,
        x,
        padding_mask=None,
        cache=None,
        cache_update_index=0,
        cache_write_end=None,
        left_padding=None,
        training=None,
    ):
        attention = self.attention(
            self.pre_attention_norm(x),
            padding_mask=padding_mask,
            cache=cache,
            cache_update_index=cache_update_index,
            cache_write_end=cache_write_end,
            left_padding=left_padding,
            training=training,
        )
        if cache is not None:
            attention, cache = attention
        if self.use_sandwich_norms:
            attention = self.post_attention_norm(attention)
        x = self._add_residual(x, self._dropped(attention, training))

        h = self.pre_ffw_norm(x)
        # `training` passed on: a quantized layer's call takes it, and
        # without it Keras' `__call__` resolves it (see DirectCall).
        gate = keras.activations.gelu(self.gating_ffw(h, training=training), approximate=True)
        h = self.ffw_linear(gate * self.gating_ffw_2(h, training=training), training=training)
        if self.use_sandwich_norms:
            h = self.post_ffw_norm(h)
        x = self._add_residual(x, self._dropped(h, training))
        return x if cache is None else (x, cache)

    def compute_output_spec(self, x, padding_mask=None, cache=None, **kwargs):
        """A block maps `[batch, seq, hidden]` to the same shape: said here
        rather than traced (Keras' default runs `call` on placeholders, which
        took 2.4 s (JAX) to 4.9 s (TensorFlow) of building gemma3_270m)."""
        if cache is not None:
            return super().compute_output_spec(
                x, padding_mask=padding_mask, cache=cache, **kwargs
            )
        return keras.KerasTensor(x.shape, dtype=self.compute_dtype)

    def _add_residual(self, x, h):
        """`x + h`; in float16 added in float32 and clipped to float16's
        range, as KerasHub's Gemma 3 does: Gemma's residual stream outgrows
        float16 (gemma3_270m's passes 65504 after its 8th block: inf, then
        NaN logits)."""
        if self.compute_dtype != "float16":
            return x + h
        total = ops.cast(x, "float32") + ops.cast(h, "float32")
        return ops.cast(ops.clip(total, -65504.0, 65504.0), "float16")

    def _dropped(self, x, training):
        # No Dropout call at rate 0 (the presets'): less for torch.compile to trace.
        return self.residual_dropout(x, training=training) if self.dropout > 0 else x

    def get_config(self):
        return {
            **super().get_config(),
            "intermediate_dim": self.intermediate_dim,
            "attention_config": self.attention_config,
            "use_sandwich_norms": self.use_sandwich_norms,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "dropout": self.dropout,
        }
