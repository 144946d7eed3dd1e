"""Text-only KerasHub Gemma 3 presets (`keras_hub>Gemma3Backbone`, saved by
`save_to_preset`) load into keras_gemma with the same logits."""

import json
import re

import keras
import keras_hub
import numpy as np
import pytest
import sentencepiece

import keras_gemma
from tests import helpers

# Gemma3Tokenizer (has_vision_tokens=True, its default and what real presets
# save) requires the image tokens in the vocabulary.
IMAGE_TOKENS = ("<img>", "<start_of_image>", "<end_of_image>")

# 7 layers: layers 0-4 and 6 slide, layer 5 is global; the window (3) is
# smaller than the 8-token input; the global layers' RoPE is scaled x8.
GEMMA3_CONFIG = dict(
    num_layers=7, num_query_heads=4, num_key_value_heads=2, hidden_dim=32,
    intermediate_dim=64, head_dim=16, use_post_ffw_norm=True,
    use_post_attention_norm=True, use_sliding_window_attention=True,
    sliding_window_size=3, global_rope_scaling_factor=8.0,
)

INPUTS = {
    "token_ids": np.array([[2, 17, 40, 99, 23, 7, 0, 0], [2, 250, 61, 5, 9, 11, 12, 13]], "int32"),
    "padding_mask": np.array([[1, 1, 1, 1, 1, 1, 0, 0], [1] * 8], "int32"),
}


@pytest.fixture(scope="module")
def gemma3_proto():
    return helpers.train_sentencepiece(extra_symbols=IMAGE_TOKENS)


@pytest.fixture(scope="module")
def gemma3_vocabulary_size(gemma3_proto):
    return sentencepiece.SentencePieceProcessor(model_proto=gemma3_proto).vocab_size()


def randomize_weights(model, seed=0):
    """Weights large enough that logits are well separated; norm weights
    random too, so that the (1 + w) convention is exercised."""
    rng = np.random.default_rng(seed)
    for weight in model.weights:
        std = 0.3 if len(weight.shape) == 1 else weight.shape[-2] ** -0.5
        weight.assign(rng.normal(0, std, weight.shape).astype("float32"))


def keras_hub_backbone(vocabulary_size, **overrides):
    backbone = keras_hub.models.Gemma3Backbone(
        vocabulary_size=vocabulary_size, image_size=16,
        **{**GEMMA3_CONFIG, **overrides},
    )
    randomize_weights(backbone)
    return backbone


def logits(model, inputs=INPUTS):
    return keras.ops.convert_to_numpy(model(inputs))


def test_causal_lm_preset_loads_with_same_logits(gemma3_proto, gemma3_vocabulary_size, tmp_path):
    preprocessor = keras_hub.models.Gemma3CausalLMPreprocessor(
        keras_hub.models.Gemma3Tokenizer(proto=gemma3_proto), sequence_length=24
    )
    reference = keras_hub.models.Gemma3CausalLM(
        backbone=keras_hub_backbone(gemma3_vocabulary_size), preprocessor=preprocessor
    )
    reference.save_to_preset(str(tmp_path))

    ours = keras_gemma.GemmaCausalLM.from_preset(str(tmp_path))
    assert isinstance(ours, keras_gemma.GemmaCausalLM)
    assert isinstance(ours.preprocessor, keras_gemma.GemmaCausalLMPreprocessor)
    assert isinstance(ours.preprocessor.tokenizer, keras_gemma.GemmaTokenizer)
    assert ours.preprocessor.sequence_length == 24
    assert ours.preprocessor.stop_tokens == ["<eos>", "<end_of_turn>"]  # As KerasHub Gemma 3.
    backbone = ours.backbone
    assert backbone.layer_types == ["sliding"] * 5 + ["global", "sliding"]
    assert backbone.sliding_window == 3
    assert backbone.rope_scaling_factor == 8.0
    assert backbone.use_query_key_norm and backbone.use_sandwich_norms
    assert backbone.intermediate_dim == 64  # Gemma 3 does not double it.

    expected = logits(reference)
    assert np.abs(expected).max() > 1.0  # Not a trivially near-zero model.
    np.testing.assert_allclose(logits(ours), expected, atol=1e-4, rtol=0)
    # Long enough that the sliding window and the global layer both matter.
    prompt = "The quick brown fox"
    assert ours.generate(prompt, max_length=20) == reference.generate(prompt, max_length=20)


def test_backbone_only_preset(gemma3_vocabulary_size, tmp_path):
    reference = keras_hub_backbone(gemma3_vocabulary_size, num_layers=6)
    reference.save_to_preset(str(tmp_path))
    ours = keras_gemma.GemmaBackbone.from_preset(str(tmp_path))
    assert isinstance(ours, keras_gemma.GemmaBackbone)
    np.testing.assert_allclose(logits(ours), logits(reference), atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_preset_loads_its_scales(gemma3_vocabulary_size, tmp_path, mode):
    """Only each layer's first weight was read: a quantized preset's scales
    stayed zero and every logit was NaN, with no error."""
    reference = keras_hub_backbone(gemma3_vocabulary_size, num_layers=6)
    reference.quantize(mode)
    reference.save_to_preset(str(tmp_path))
    ours = keras_gemma.GemmaBackbone.from_preset(str(tmp_path))
    query = ours.transformer_layers[0].attention.query_dense
    assert query.quantization_mode == mode
    expected = logits(reference)
    assert np.isfinite(expected).all() and np.abs(expected).max() > 1.0
    # Same integers and scales; the products may round differently.
    np.testing.assert_allclose(logits(ours), expected, atol=1e-4, rtol=0)


def test_weights_a_layer_does_not_have_are_a_clear_error(gemma3_vocabulary_size, tmp_path):
    import h5py

    keras_hub_backbone(gemma3_vocabulary_size, num_layers=1).save_to_preset(str(tmp_path))
    with h5py.File(tmp_path / "model.weights.h5", "r+") as f:
        f["layers/gemma3_decoder_block/attention/query_dense/vars/1"] = np.ones(4, "float32")
    with pytest.raises(ValueError, match="query_dense holds 2 weights, but this model's layer .*query has 1: .*another configuration or quantization"):
        keras_gemma.GemmaBackbone.from_preset(str(tmp_path))


def test_rope_bases_and_scaling_follow_keras_hub():
    # Gemma 3 4B+ config: all RoPE constants that KerasHub hard-codes.
    from keras_gemma.checkpoints.keras_preset import backbone_kwargs_from_keras_hub

    kwargs = backbone_kwargs_from_keras_hub(gemma3=True, config=dict(
        vocabulary_size=10, image_size=896, num_layers=12, num_query_heads=32,
        num_key_value_heads=16, hidden_dim=5376, intermediate_dim=21504,
        head_dim=128, query_head_dim_normalize=False, use_query_key_norm=True,
        use_post_ffw_norm=True, use_post_attention_norm=True,
        use_sliding_window_attention=True, sliding_window_size=1024,
        local_rope_scaling_factor=1.0, global_rope_scaling_factor=8.0,
        vision_encoder=None,
    ))
    assert kwargs["rope_max_wavelength"] == 1_000_000.0
    assert kwargs["local_rope_max_wavelength"] == 10_000.0
    assert kwargs["rope_scaling_factor"] == 8.0
    assert [i for i, t in enumerate(kwargs["layer_types"]) if t == "global"] == [5, 11]
    assert kwargs["query_scale"] == 168  # Gemma 3 27B, as in transformers.
    keras_gemma.GemmaBackbone(**{**kwargs, "hidden_dim": 32, "intermediate_dim": 8,
                                 "head_dim": 4, "num_query_heads": 2,
                                 "num_key_value_heads": 1})


def test_vision_model_is_a_clear_error():
    from keras_gemma.checkpoints.keras_preset import translate_config

    config = {
        "registered_name": "keras_hub>Gemma3Backbone",
        "config": dict(GEMMA3_CONFIG, vocabulary_size=10, image_size=16,
                       vision_encoder={"class_name": "Gemma3VisionEncoder"}),
    }
    with pytest.raises(ValueError, match="vision encoder.*text-only"):
        translate_config(config)


def test_sharded_gemma3_weights(gemma3_vocabulary_size, tmp_path):
    """KerasHub shards presets over 10 GB (Gemma 3 12B and 27B on Kaggle);
    they were refused."""
    reference = keras_hub_backbone(gemma3_vocabulary_size, num_layers=3)
    reference.save_to_preset(str(tmp_path), max_shard_size=0.00005)  # ~52 KB shards.
    shards = sorted(tmp_path.glob("model_*.weights.h5"))
    assert len(shards) > 3 and not (tmp_path / "model.weights.h5").exists()
    ours = keras_gemma.GemmaBackbone.from_preset(str(tmp_path))
    np.testing.assert_allclose(logits(ours), logits(reference), atol=1e-4, rtol=0)

    shards[-1].unlink()
    with pytest.raises((OSError, ValueError), match=shards[-1].name):
        keras_gemma.GemmaBackbone.from_preset(str(tmp_path))
    (tmp_path / "model.weights.json").write_text("{}")
    with pytest.raises(ValueError, match="model.weights.json lists no weight files"):
        keras_gemma.GemmaBackbone.from_preset(str(tmp_path))


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_keras_hub_gemma1_weights_are_a_clear_error(vocabulary_size, tmp_path):
    keras_hub.models.GemmaBackbone(
        vocabulary_size=vocabulary_size, num_layers=1, num_query_heads=4,
        num_key_value_heads=1, hidden_dim=32, intermediate_dim=128, head_dim=16,
    ).save_to_preset(str(tmp_path))
    weights = tmp_path / "model.weights.h5"
    _truncate(weights)
    with pytest.raises(OSError, match="(?s)Cannot read the weights in " + re.escape(str(weights)) + ".*truncated"):
        keras_gemma.GemmaBackbone.from_preset(str(tmp_path))


def test_truncated_keras_hub_gemma3_weights_are_a_clear_error(gemma3_vocabulary_size, tmp_path):
    keras_hub_backbone(gemma3_vocabulary_size, num_layers=1).save_to_preset(str(tmp_path))
    weights = tmp_path / "model.weights.h5"
    _truncate(weights)
    with pytest.raises(OSError, match="(?s)Cannot read the weights in " + re.escape(str(weights)) + ".*truncated"):
        keras_gemma.GemmaBackbone.from_preset(str(tmp_path))


@pytest.mark.parametrize("sharded", [False, True])
def test_a_config_with_fewer_layers_than_the_weights_is_a_clear_error(sharded, gemma3_vocabulary_size, tmp_path):
    """A KerasHub Gemma 3 preset whose config says fewer layers than its
    weights hold loaded the first blocks without a word."""
    keras_hub_backbone(gemma3_vocabulary_size, num_layers=3).save_to_preset(
        str(tmp_path), **({"max_shard_size": 0.00005} if sharded else {})
    )
    config = json.loads((tmp_path / "config.json").read_text())
    config["config"]["num_layers"] = 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="holds 3 decoder blocks, but the preset's config gives num_layers=2"):
        keras_gemma.GemmaBackbone.from_preset(str(tmp_path))
