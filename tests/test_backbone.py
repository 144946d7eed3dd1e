import keras
import numpy as np
import pytest

import keras_gemma
from tests import helpers

# float32 parity with transformers (eager attention), identical weights.
TOLERANCE = 1e-4


@pytest.mark.parametrize("config", [helpers.TINY_MQA, helpers.TINY_MHA], ids=["mqa", "mha"])
def test_logits_match_transformers(config, vocabulary_size):
    hf_model, ours = helpers.hf_reference_and_ours(vocabulary_size, config)
    token_ids = helpers.random_token_ids(vocabulary_size, (2, 12))
    padding_mask = np.ones_like(token_ids)
    expected = helpers.hf_logits(hf_model, token_ids)
    logits = keras.ops.convert_to_numpy(
        ours({"token_ids": token_ids, "padding_mask": padding_mask})
    )
    assert np.abs(expected).max() > 1.0  # Not a trivially small model.
    np.testing.assert_allclose(logits, expected, atol=TOLERANCE, rtol=0)


def test_right_padding_does_not_change_real_positions(vocabulary_size):
    hf_model, ours = helpers.hf_reference_and_ours(vocabulary_size, helpers.TINY_MQA)
    token_ids = helpers.random_token_ids(vocabulary_size, (2, 10))
    padding_mask = np.ones_like(token_ids)
    padding_mask[1, 6:] = 0
    logits = keras.ops.convert_to_numpy(
        ours({"token_ids": token_ids, "padding_mask": padding_mask})
    )
    expected = helpers.hf_logits(hf_model, token_ids[1:, :6])
    np.testing.assert_allclose(logits[1, :6], expected[0], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("config", [helpers.TINY_MQA, helpers.TINY_MHA], ids=["mqa", "mha"])
def test_cached_decoding_matches_full_forward(config, vocabulary_size):
    _, ours = helpers.hf_reference_and_ours(vocabulary_size, config)
    token_ids = helpers.random_token_ids(vocabulary_size, (2, 9))
    full = keras.ops.convert_to_numpy(
        ours({"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)})
    )
    # Prefill the first 4 tokens in one pass, then one token per step.
    cache = ours.backbone.empty_cache(batch_size=2, max_length=9)
    logits, _, cache = ours.call_with_cache(token_ids[:, :4], cache, 0)
    steps = [keras.ops.convert_to_numpy(logits)]
    for i in range(4, 9):
        logits, _, cache = ours.call_with_cache(token_ids[:, i : i + 1], cache, i)
        steps.append(keras.ops.convert_to_numpy(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5, rtol=0)


def test_cache_overflow_is_an_error(vocabulary_size):
    """A step past the cache's end was clamped into its last slot: wrong
    logits (0.5 off) and no error."""
    gemma_lm = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(vocabulary_size=vocabulary_size, **helpers.TINY_MQA))
    token_ids = helpers.random_token_ids(vocabulary_size, (1, 9))
    cache = gemma_lm.backbone.empty_cache(batch_size=1, max_length=8)
    _, _, cache = gemma_lm.call_with_cache(token_ids[:, :8], cache, 0)  # Fills it exactly.
    with pytest.raises(ValueError, match=r"positions 8..8 do not fit a cache of 8 positions; make it with empty_cache\(batch_size, max_length=9\)"):
        gemma_lm.call_with_cache(token_ids[:, 8:], cache, 8)
    with pytest.raises(ValueError, match="positions 0..8 do not fit a cache of 8"):
        gemma_lm.call_with_cache(token_ids, gemma_lm.backbone.empty_cache(1, 8), 0)


def test_empty_cache_refuses_zero_sizes():
    backbone = keras_gemma.GemmaBackbone(vocabulary_size=50, **helpers.TINY_MHA)
    with pytest.raises(ValueError, match="max_length must be at least 1, got 0"):
        backbone.empty_cache(1, 0)
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        backbone.empty_cache(0, 8)


@pytest.mark.parametrize("dtype", ["float32", "mixed_bfloat16", "float16"])
def test_building_states_block_outputs_without_running_them(dtype, monkeypatch):
    """The functional model is built from each block's stated output (the
    input's shape, the compute dtype): tracing the blocks took 2.4-4.9 s of
    loading gemma3_270m. The stated outputs must be what the blocks give."""
    calls = helpers.record_block_calls(monkeypatch)
    gemma3_like = dict(
        helpers.TINY_MQA, layer_types=["sliding", "global"], sliding_window=4,
        use_sandwich_norms=True, use_query_key_norm=True,
    )
    gemma_lm = keras_gemma.GemmaCausalLM(
        keras_gemma.GemmaBackbone(vocabulary_size=50, dtype=dtype, **gemma3_like)
    )
    assert calls == []
    token_ids = helpers.random_token_ids(50, (2, 6))
    inputs = {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}
    for model in (gemma_lm.backbone, gemma_lm):
        output = model(inputs)
        assert model.output.shape[-1] == output.shape[-1]
        assert model.output.dtype == keras.backend.standardize_dtype(output.dtype)
    assert calls == ["decoder_block_0", "decoder_block_1"] * 2


@pytest.mark.parametrize("dtype, logits_dtype", [("mixed_bfloat16", "float32"), ("bfloat16", "bfloat16")])
def test_logits_of_a_mixed_policy_are_float32(dtype, logits_dtype):
    """They were bfloat16, where KerasHub's are float32 (Keras'
    ReversibleEmbedding): Keras' SparseCategoricalAccuracy casts labels to
    the logits' dtype, and bfloat16 rounds ids above 256 (257 counted as
    256), so accuracies from KerasHub's docs came out wrong."""
    gemma_lm = keras_gemma.GemmaCausalLM(
        keras_gemma.GemmaBackbone(vocabulary_size=300, dtype=dtype, **helpers.TINY_MQA)
    )
    token_ids = helpers.random_token_ids(300, (2, 6))
    inputs = {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}
    logits = gemma_lm(inputs)
    assert keras.backend.standardize_dtype(logits.dtype) == logits_dtype == gemma_lm.output.dtype
    assert gemma_lm.predict(inputs, verbose=0).dtype == logits_dtype
    # The product of the hidden states and the table (in bfloat16 both).
    hidden = keras.ops.convert_to_numpy(keras.ops.cast(gemma_lm.backbone(inputs), "float32"))
    table = keras.ops.convert_to_numpy(keras.ops.cast(gemma_lm.backbone.token_embedding.embeddings, "float32"))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(keras.ops.cast(logits, "float32")), hidden @ table.T, rtol=2e-2, atol=2e-2
    )


def test_config_round_trip():
    backbone = keras_gemma.GemmaBackbone(vocabulary_size=50, **helpers.TINY_MHA)
    restored = keras_gemma.GemmaBackbone.from_config(backbone.get_config())
    assert restored.get_config() == backbone.get_config()
    assert restored.count_params() == backbone.count_params()


def test_parameter_count_matches_formula():
    V, L, N, K, D, F, H = 50, 2, 4, 4, 48, 96, 16
    backbone = keras_gemma.GemmaBackbone(vocabulary_size=V, **helpers.TINY_MHA)
    per_layer = D * H * (N + 2 * K) + N * H * D + 3 * D * F + 2 * D
    assert backbone.count_params() == V * D + L * per_layer + D


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_key_value_heads=3), "multiple of num_key_value_heads"),
        (dict(layer_types=["global"]), "num_layers is 2"),
        (dict(layer_types=["global", "local"]), "Unknown layer types"),
        (dict(layer_types=["sliding", "global"]), "sliding_window is not set"),
        (dict(num_layers=0), "num_layers must be a whole number >= 1, got 0"),  # Built, layerless.
        (dict(hidden_dim=-32), "hidden_dim must be a whole number >= 1, got -32"),
        (dict(num_query_heads="4"), "num_query_heads must be a whole number >= 1, got '4'"),
    ],
)
def test_bad_config_is_a_clear_error(overrides, message):
    config = {**helpers.TINY_MQA, **overrides}
    with pytest.raises(ValueError, match=message):
        keras_gemma.GemmaBackbone(vocabulary_size=50, **config)


def test_misspelt_argument_is_rejected():
    with pytest.raises(TypeError, match="unexpected arguments \\['sliding_window_size'\\]"):
        keras_gemma.GemmaBackbone(vocabulary_size=50, sliding_window_size=4, **helpers.TINY_MQA)


def test_untied_embedding_is_refused():
    """Every Gemma ties its input and output embeddings; the vocabulary
    projection reads the one table, so an untied layer would silently use it."""
    from keras_gemma.layers.embedding import ReversibleEmbedding

    with pytest.raises(ValueError, match="tie_weights=True"):
        ReversibleEmbedding(10, 4, tie_weights=False)
    layer = ReversibleEmbedding(10, 4)
    assert ReversibleEmbedding.from_config(layer.get_config()).tie_weights


@pytest.mark.parametrize("start", [0, 40_000, 131_000])
def test_rotary_embedding_matches_transformers_at_long_positions(start):
    """Gemma 3's global (base 1e6, linear x8) and local (base 1e4) RoPE.
    TensorFlow's float32 `power` was an ulp off for some frequencies: 2e-2
    off transformers by position 131k."""
    import torch
    from transformers.models.gemma3 import modeling_gemma3

    from keras_gemma.layers.rotary_embedding import rotary_tables, rotate

    config = modeling_gemma3.Gemma3TextConfig(
        head_dim=256,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
    )
    rotary = modeling_gemma3.Gemma3RotaryEmbedding(config)
    x = np.random.default_rng(0).normal(size=(1, 8, 2, 256)).astype("float32")
    positions = torch.arange(start, start + 8)[None]
    for layer_type, base, factor in (("full_attention", 1e6, 8.0), ("sliding_attention", 1e4, 1.0)):
        cos, sin = rotary(torch.zeros(1), positions, layer_type=layer_type)
        theirs = torch.from_numpy(x).transpose(1, 2)
        expected = modeling_gemma3.apply_rotary_pos_emb(theirs, theirs, cos, sin)[0].transpose(1, 2).numpy()
        tables = rotary_tables(start, 8, 256, base, factor)
        ours = keras.ops.convert_to_numpy(rotate(keras.ops.convert_to_tensor(x), *tables))
        np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0, err_msg=layer_type)
