"""Model layers: normalization, rotary embedding, attention and the decoder block."""
