import numpy as np
from keras import ops


def apply_rotary_embedding(x, start_index, max_wavelength, scaling_factor=1.0):
    """Rotate-half RoPE over the full head dim of `x` `[batch, seq, heads, head_dim]`.

    Dimension `j` pairs with `j + head_dim / 2`. Positions are
    `start_index + arange(seq)`. `scaling_factor` divides the inverse
    frequencies (linear RoPE scaling, Gemma 3 global layers). The angles are
    computed in float32 and cast to `x`'s dtype before the rotation.
    """
    head_dim = x.shape[-1]
    # A NumPy constant, as transformers rounds it: float32 exponents, the
    # power rounded to float32, its float32 reciprocal. The backends'
    # float32 `power` differ by an ulp here and there, which moved
    # TensorFlow's angles by up to 2e-2 at position 131k.
    exponents = np.arange(0, head_dim, 2, dtype="float32") / np.float32(head_dim)
    powers = (float(max_wavelength) ** exponents.astype("float64")).astype("float32")
    inverse_freq = np.float32(1.0) / powers / np.float32(scaling_factor)
    # Keras' conversion puts it on the current device (PyTorch's "meta"
    # while a model is built symbolically; a CPU tensor there fails and
    # Keras redoes the whole build on real CPU tensors).
    inverse_freq = ops.convert_to_tensor(inverse_freq)
    positions = ops.arange(ops.shape(x)[1], dtype="float32")
    positions = positions + ops.cast(start_index, "float32")
    angles = positions[:, None] * inverse_freq[None, :]
    angles = ops.concatenate([angles, angles], axis=-1)[None, :, None, :]
    cos = ops.cast(ops.cos(angles), x.dtype)
    sin = ops.cast(ops.sin(angles), x.dtype)
    first_half, second_half = ops.split(x, 2, axis=-1)
    rotated = ops.concatenate([-second_half, first_half], axis=-1)
    return x * cos + rotated * sin
