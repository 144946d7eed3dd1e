"""Gemma 2 and Gemma 3 (text) in the one backbone, against transformers."""

import keras
import numpy as np
import pytest

import keras_gemma
from tests import helpers

TOLERANCE = 1e-4  # float32, identical weights, eager attention.
SEQUENCE = 12  # Longer than the sliding window below.

# Every feature: soft-caps small enough to bite, a window (4) smaller than the
# sequence, global layers, a query scale (24) != head_dim (16).
GEMMA2 = dict(
    num_layers=3, num_query_heads=4, num_key_value_heads=2,
    hidden_dim=32, intermediate_dim=64, head_dim=16,
    hf_extra=dict(
        query_pre_attn_scalar=24, attn_logit_softcapping=3.0,
        final_logit_softcapping=5.0, sliding_window=4,
    ),
)
# Gemma 3: QK-norm, 5:1-style pattern (explicit here: 2 local, 1 global, 1
# local), local and global RoPE bases, linear x8 scaling on global layers.
GEMMA3 = dict(
    num_layers=4, num_query_heads=4, num_key_value_heads=1,
    hidden_dim=32, intermediate_dim=64, head_dim=16,
    hf_extra=dict(
        query_pre_attn_scalar=24, sliding_window=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
    ),
)
FAMILIES = {"gemma2": GEMMA2, "gemma3_text": GEMMA3}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def models(request, vocabulary_size):
    family = request.param
    return helpers.hf_reference_and_ours(
        vocabulary_size, FAMILIES[family], seed=2, family=family
    )


def test_config_carries_every_feature(models):
    hf_model, ours = models
    backbone = ours.backbone
    assert backbone.query_scale == 24
    assert backbone.sliding_window == 4
    assert "global" in backbone.layer_types and "sliding" in backbone.layer_types
    if hf_model.config.model_type == "gemma2":
        assert backbone.attention_logit_soft_cap == 3.0
        assert backbone.final_logit_soft_cap == 5.0
        assert backbone.layer_types == ["sliding", "global", "sliding"]
    else:
        assert backbone.use_query_key_norm
        assert backbone.rope_scaling_factor == 8.0
        assert backbone.rope_max_wavelength == 1_000_000.0
        assert backbone.local_rope_max_wavelength == 10_000.0


def test_logits_match_transformers(models, vocabulary_size):
    hf_model, ours = models
    token_ids = helpers.random_token_ids(vocabulary_size, (2, SEQUENCE), seed=4)
    expected = helpers.hf_logits(hf_model, token_ids)
    logits = keras.ops.convert_to_numpy(
        ours({"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)})
    )
    np.testing.assert_allclose(logits, expected, atol=TOLERANCE, rtol=0)


def test_fused_attention_gives_the_same_logits_and_gradients(models, vocabulary_size, monkeypatch):
    """On a GPU, JAX and PyTorch attend over whole sequences with Keras'
    `dot_product_attention` (fused kernels, no scores kept for the backward
    pass). Forced here, where the same op runs unfused: the same logits and
    gradients as our attention, with padding, sliding windows, QK-norm and a
    query scale. Gemma 2 (soft-capped scores) and TensorFlow keep ours."""
    from keras_gemma.layers import attention

    hf_model, ours = models
    backbone = ours.backbone
    token_ids = helpers.random_token_ids(vocabulary_size, (2, SEQUENCE), seed=5)
    padding_mask = np.ones_like(token_ids)
    padding_mask[1, 7:] = 0
    weights = np.random.default_rng(0).normal(size=(2, SEQUENCE, vocabulary_size))
    weights = (weights * padding_mask[:, :, None]).astype("float32")

    def loss():
        logits = ours({"token_ids": token_ids, "padding_mask": padding_mask})
        return keras.ops.sum(keras.ops.multiply(logits, weights))

    def logits_and_gradients(fused):
        monkeypatch.setattr(attention, "fused_attention_kernels", lambda: fused)
        logits = ours({"token_ids": token_ids, "padding_mask": padding_mask})
        logits = keras.ops.convert_to_numpy(keras.ops.stop_gradient(logits))
        return logits, helpers.gradients(loss, backbone.weights)

    layer = backbone.transformer_layers[0].attention
    fuses = hf_model.config.model_type == "gemma3_text" and keras.config.backend() != "tensorflow"
    monkeypatch.setattr(attention, "fused_attention_kernels", lambda: True)
    assert layer._fuses_attention() == fuses
    if not fuses:
        return  # Both runs would take our attention.
    calls = []
    fused_op = keras.ops.dot_product_attention
    monkeypatch.setattr(keras.ops, "dot_product_attention", lambda *a, **k: calls.append(1) or fused_op(*a, **k))
    logits, grads = logits_and_gradients(fused=True)
    assert calls
    fused_calls = len(calls)
    expected_logits, expected_grads = logits_and_gradients(fused=False)
    assert len(calls) == fused_calls
    np.testing.assert_allclose(logits, expected_logits, atol=1e-5, rtol=0)
    for grad, expected in zip(grads, expected_grads):
        assert np.abs(expected).max() > 0
        np.testing.assert_allclose(grad, expected, atol=1e-4, rtol=1e-4)


def test_feature_changes_move_the_logits(models, vocabulary_size):
    """Guard against a feature that is silently ignored on both sides: turning
    it off on our side alone must break the match."""
    hf_model, ours = models
    token_ids = helpers.random_token_ids(vocabulary_size, (1, SEQUENCE), seed=4)
    expected = helpers.hf_logits(hf_model, token_ids)
    config = ours.backbone.get_config()
    for change in ({"sliding_window": 64}, {"query_scale": None}):
        altered = keras_gemma.GemmaBackbone.from_config({**config, **change})
        altered.set_weights(ours.backbone.get_weights())
        logits = keras.ops.convert_to_numpy(
            keras_gemma.GemmaCausalLM(altered)(
                {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}
            )
        )
        assert np.abs(logits - expected).max() > 100 * TOLERANCE, change


def test_cached_decoding_past_the_window_matches_full_forward(models, vocabulary_size):
    _, ours = models
    token_ids = helpers.random_token_ids(vocabulary_size, (2, SEQUENCE), seed=5)
    full = keras.ops.convert_to_numpy(
        ours({"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)})
    )
    cache = ours.backbone.empty_cache(batch_size=2, max_length=SEQUENCE)
    # Sliding layers keep a ring buffer of the window size only.
    slots = [layer_cache[0].shape[1] for layer_cache in cache]
    assert slots == [4 if t == "sliding" else SEQUENCE for t in ours.backbone.layer_types]
    # A 3-token prefill chunk, then single tokens, then a 3-token chunk
    # that wraps around the ring.
    chunks = [(0, 3), (3, 4), (4, 5), (5, 6), (6, 9), (9, 10), (10, 11), (11, 12)]
    steps = []
    for start, end in chunks:
        logits, _, cache = ours.call_with_cache(token_ids[:, start:end], cache, start)
        steps.append(keras.ops.convert_to_numpy(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5, rtol=0)


def test_greedy_generation_past_the_window_matches_transformers(models):
    hf_model, ours = models
    prompts = [[2, 17, 40, 99, 23], [2, 250, 61]]
    token_ids = np.zeros((2, 14), "int32")
    padding_mask = np.zeros((2, 14), "int32")
    for row, prompt in enumerate(prompts):
        token_ids[row, : len(prompt)] = prompt
        padding_mask[row, : len(prompt)] = 1
    out = ours.generate({"token_ids": token_ids, "padding_mask": padding_mask}, stop_token_ids=None)
    for row, prompt in enumerate(prompts):
        ids = list(prompt)
        while len(ids) < 14:
            ids.append(int(np.argmax(helpers.hf_logits(hf_model, np.array([ids]))[0, -1])))
        np.testing.assert_array_equal(np.asarray(out["token_ids"])[row], ids)


# Measured max |bf16 - f32| on these models: 0.06-0.09 with logits up to ~4
# (at most 2.3% of the largest logit) on all three backends. bf16 keeps 8
# mantissa bits (0.4% relative per op) and the error compounds over layers.
# We allow 5% of the largest logit, and require the top token to agree
# wherever float32's top-2 margin is more than twice that bound.
BF16_RELATIVE = 0.05


def test_bfloat16_stays_close_to_float32(models, vocabulary_size):
    _, ours = models
    config = {**ours.backbone.get_config(), "dtype": "bfloat16"}
    half = keras_gemma.GemmaBackbone.from_config(config)
    half.set_weights(ours.backbone.get_weights())
    token_ids = helpers.random_token_ids(vocabulary_size, (2, SEQUENCE), seed=6)
    inputs = {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}
    full = keras.ops.convert_to_numpy(ours(inputs))
    low = keras_gemma.GemmaCausalLM(half)(inputs)
    # Computed in bf16 throughout, not silently promoted to float32.
    assert keras.backend.standardize_dtype(low.dtype) == "bfloat16"
    assert keras.backend.standardize_dtype(half(inputs).dtype) == "bfloat16"
    low = keras.ops.convert_to_numpy(keras.ops.cast(low, "float32"))
    bound = BF16_RELATIVE * np.abs(full).max()
    assert np.abs(low - full).max() < bound
    top2 = np.sort(full, axis=-1)[..., -2:]
    clear = (top2[..., 1] - top2[..., 0]) > 2 * bound
    assert clear.any()
    np.testing.assert_array_equal(low.argmax(-1)[clear], full.argmax(-1)[clear])
    # Generation runs in bfloat16 too: each generated token is the argmax
    # of the full bfloat16 forward pass over the sequence before it
    # (where that argmax is clear of bfloat16 rounding).
    half_lm = keras_gemma.GemmaCausalLM(half)
    out = half_lm.generate(
        {"token_ids": token_ids[:, :8], "padding_mask": np.ones((2, 8), "int32") * (np.arange(8) < 4)},
        stop_token_ids=None,
    )
    generated = np.asarray(out["token_ids"])
    assert generated.shape == (2, 8)
    replayed = half_lm({"token_ids": generated, "padding_mask": np.ones_like(generated)})
    replayed = keras.ops.convert_to_numpy(keras.ops.cast(replayed, "float32"))[:, 3:7]
    top2 = np.sort(replayed, axis=-1)[..., -2:]
    clear = (top2[..., 1] - top2[..., 0]) > 2 * bound
    assert clear.sum() >= 2
    np.testing.assert_array_equal(generated[:, 4:8][clear], replayed.argmax(-1)[clear])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_embedding_scale_and_norm_equal_transformers(dtype):
    """Bit for bit: the sqrt(hidden_dim) scale is rounded to the compute
    dtype before the product (2304 -> 48.0 in bfloat16, 640 -> 25.25), and
    RMSNorm computes in float32 and casts after its `1 + scale` product
    (a whole-model comparison in 16-bit cannot see either: its noise is
    larger). Widths of real models and of the tiny test configs."""
    import torch
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

    from keras_gemma.layers.embedding import EmbeddingScale
    from keras_gemma.layers.rms_normalization import RMSNormalization

    torch_dtype = getattr(torch, dtype)
    rng = np.random.default_rng(0)
    for width in (32, 48, 640, 1152, 2048, 2304, 3072, 3584, 5376):
        reference = Gemma3TextScaledWordEmbedding(16, width, 0, embed_scale=width**0.5).to(torch_dtype)
        with torch.no_grad():
            expected = reference(torch.arange(16)).float().numpy()
        table = keras.ops.convert_to_tensor(reference.weight.detach().float().numpy(), dtype)
        scaled = EmbeddingScale(width, dtype=dtype)(table)
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(keras.ops.cast(scaled, "float32")), expected)

        x = rng.normal(0, 3, (4, width)).astype("float32")
        scale = rng.normal(0, 0.5, width).astype("float32")
        norm = GemmaRMSNorm(width, eps=1e-6)
        with torch.no_grad():
            norm.weight.copy_(torch.from_numpy(scale))
            expected = norm.to(torch_dtype)(torch.from_numpy(x).to(torch_dtype)).float().numpy()
        ours = RMSNormalization(epsilon=1e-6, dtype=dtype)
        ours.build((4, width))
        ours.scale.assign(scale)  # Rounded to the dtype, as .to() rounds HF's weight.
        half_x = keras.ops.cast(keras.ops.convert_to_tensor(x), dtype)
        actual = keras.ops.convert_to_numpy(keras.ops.cast(ours(half_x), "float32"))
        # float32 reductions in another order can land a value on the other
        # side of a rounding boundary: one last-place step, rarely (a cast
        # before the product would round a quarter of them otherwise).
        differs = actual != expected
        assert differs.mean() < 0.002, f"width {width}: {differs.mean():.2%} differ"
        mantissa_bits = 7 if dtype == "bfloat16" else 10
        np.testing.assert_array_less(np.abs(actual - expected)[differs], np.abs(expected[differs]) * 2.0**-mantissa_bits)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_query_scaling_equals_transformers(dtype):
    """Bit for bit: the query times `query_scale ** -0.5`, rounded once (as
    PyTorch multiplies a 16-bit tensor by a Python float). The scale rounded
    to bfloat16 first (KerasHub's and Flax's way) made every score of Gemma 2
    27B (144 ** -0.5) 0.2% larger in bfloat16."""
    import torch

    from keras_gemma.layers.attention import GemmaAttention

    query = np.random.default_rng(0).normal(0, 3, (2, 5, 4, 16)).astype("float32")
    for query_scale in (16, 144, 168, 224, 256):
        attention = GemmaAttention(4, 1, 16, query_scale=query_scale, dtype=dtype)
        reference = torch.from_numpy(query).to(getattr(torch, dtype))
        expected = (reference * query_scale**-0.5).float().numpy()
        ours = attention.scaled_query(keras.ops.cast(keras.ops.convert_to_tensor(query), dtype))
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(keras.ops.cast(ours, "float32")), expected)
