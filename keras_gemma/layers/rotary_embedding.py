import keras
from keras import ops


def rotary_tables(
    start_index, length, head_dim, max_wavelength, scaling_factor=1.0, dtype="float32", left_padding=None
):
    """Rotate-half RoPE's `(cos, sin)` for positions `start_index +
    arange(length)`, each `[1, length, 1, head_dim]` in `dtype`: computed
    once per attention call for its queries and keys. With `left_padding`
    `[batch]` (rows whose tokens start that many columns late), row `r`'s
    positions are `start_index + arange(length) - left_padding[r]`, and
    the tables `[batch, length, 1, head_dim]`.

    `scaling_factor` divides the inverse frequencies (linear RoPE scaling,
    Gemma 3 global layers). The angles are computed in float32 and cast to
    `dtype`.
    """
    # Rounded as transformers does: float32 exponents, the power rounded
    # to float32, then a float32 reciprocal. TensorFlow's float32 `power`
    # is an ulp off for some frequencies, which moved its angles by 2e-2 at
    # position 131k; taken in float64 it is not (JAX has no float64 without
    # x64, and warns: float32 there, within 1.2e-5). Not a NumPy constant:
    # inside `torch.compile` that broke the graph.
    wide = "float32" if keras.config.backend() == "jax" else "float64"
    exponents = ops.arange(0, head_dim, 2, dtype="float32") / head_dim
    powers = ops.power(ops.cast(max_wavelength, wide), ops.cast(exponents, wide))
    inverse_freq = 1.0 / ops.cast(powers, "float32")
    inverse_freq = inverse_freq / scaling_factor
    positions = ops.arange(length, dtype="float32")
    positions = (positions + ops.cast(start_index, "float32"))[None, :]
    if left_padding is not None:
        positions = positions - ops.cast(left_padding, "float32")[:, None]
    angles = positions[:, :, None] * inverse_freq[None, None, :]
    angles = ops.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return ops.cast(ops.cos(angles), dtype), ops.cast(ops.sin(angles), dtype)


def rotate(x, cos, sin):
    """Apply `rotary_tables` to `x` `[batch, seq, heads, head_dim]`: dimension
    `j` pairs with `j + head_dim / 2`."""
    first_half, second_half = ops.split(x, 2, axis=-1)
    rotated = ops.concatenate([-second_half, first_half], axis=-1)
    return x * cos + rotated * sin
