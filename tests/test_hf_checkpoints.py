"""Hugging Face checkpoint directories: importing (safetensors, sharded,
bfloat16, multimodal Gemma 3) and exporting, against transformers."""

import io
import json
import os
import pickle
import re
import shutil
import sys

import keras
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file
from safetensors.torch import save_file

import keras_gemma
from keras_gemma.checkpoints import hf
from tests import helpers
from tests.test_families import GEMMA2
from tests.test_families import GEMMA3

TOLERANCE = 1e-4  # float32, identical weights, eager attention.
SEQUENCE = 12  # Longer than the Gemma 2/3 configs' sliding window (4).
FAMILIES = {"gemma": helpers.TINY_MQA, "gemma2": GEMMA2, "gemma3_text": GEMMA3}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_models(request, vocabulary_size):
    """`(family, transformers model, our GemmaCausalLM with its weights)`."""
    family = request.param
    hf_model, ours = helpers.hf_reference_and_ours(
        vocabulary_size, FAMILIES[family], seed=3, family=family
    )
    return family, hf_model, ours


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory, spm_proto, vocabulary_size):
    """A saved tiny Gemma 1 checkpoint directory; tests copy it and break it."""
    hf_model, _ = helpers.hf_reference_and_ours(vocabulary_size, helpers.TINY_MQA, seed=1)
    path = tmp_path_factory.mktemp("gemma") / "checkpoint"
    save_hf(hf_model, path, spm_proto)
    return path


def tiny_gemma_lm(spm_proto, vocabulary_size, **kwargs):
    backbone = keras_gemma.GemmaBackbone(
        vocabulary_size=vocabulary_size, **helpers.TINY_MQA, **kwargs
    )
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor(keras_gemma.GemmaTokenizer(proto=spm_proto))
    return keras_gemma.GemmaCausalLM(backbone, preprocessor)


def save_hf(hf_model, path, spm_proto, **kwargs):
    hf_model.save_pretrained(path, **kwargs)
    (path / "tokenizer.model").write_bytes(spm_proto)


def our_logits(gemma_lm, token_ids):
    inputs = {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}
    return keras.ops.convert_to_numpy(gemma_lm(inputs))


def assert_same_logits(gemma_lm, hf_model, vocabulary_size, seed=7):
    token_ids = helpers.random_token_ids(vocabulary_size, (2, SEQUENCE), seed=seed)
    np.testing.assert_allclose(
        our_logits(gemma_lm, token_ids),
        helpers.hf_logits(hf_model, token_ids),
        atol=TOLERANCE, rtol=0,
    )


def test_convert_writes_a_keras_preset_with_the_same_logits(gemma_dir, vocabulary_size, tmp_path, capsys, monkeypatch):
    import safetensors

    from keras_gemma.checkpoints.convert import convert

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    destination = tmp_path / "preset"
    convert(str(gemma_dir), str(destination), dtype="bfloat16")
    # On a terminal's stderr, the progress bar counted every tensor of its
    # known total and ended its line; nothing went to stdout.
    with safetensors.safe_open(gemma_dir / "model.safetensors", "np") as weights:
        tensors = len(list(weights.keys()))
    progress = terminal.getvalue()
    assert progress.endswith("\n") and f"{tensors}/{tensors}" in progress.splitlines()[-1]
    assert capsys.readouterr().out == ""
    monkeypatch.undo()
    config = json.loads((destination / "config.json").read_text())
    assert config["config"]["dtype"]["config"]["name"] == "bfloat16"
    # (Loaded, a float preset takes Keras' default dtype unless told, as KerasHub's do.)
    converted = keras_gemma.GemmaCausalLM.from_preset(str(destination), dtype="bfloat16")
    original = keras_gemma.GemmaCausalLM.from_preset(str(gemma_dir), dtype="bfloat16")
    token_ids = helpers.random_token_ids(vocabulary_size, (1, 8))
    np.testing.assert_array_equal(our_logits(converted, token_ids), our_logits(original, token_ids))
    with pytest.raises(ValueError, match="Unknown target format 'onnx'"):
        convert(str(gemma_dir), str(tmp_path / "other"), to="onnx")
    assert sorted(os.listdir(tmp_path)) == ["preset"]


def test_from_preset_arguments_apply_to_imported_checkpoints(gemma_dir):
    """Arguments are applied to an imported (non-Keras) checkpoint, or
    refused with the list of those that apply; none is silently ignored."""
    path = str(gemma_dir)
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor.from_preset(path, sequence_length=64)
    assert preprocessor.sequence_length == 64
    tokenizer = keras_gemma.GemmaTokenizer.from_preset(path, dtype="int64")
    assert tokenizer.compute_dtype == "int64"

    loaded = keras_gemma.GemmaBackbone.from_preset(path)
    fresh = keras_gemma.GemmaBackbone.from_preset(path, load_weights=False, dtype="bfloat16")
    assert fresh.count_params() == loaded.count_params()
    assert fresh.dtype_policy.name == "bfloat16"
    embedding = keras.ops.convert_to_numpy(keras.ops.cast(fresh.token_embedding.embeddings, "float32"))
    assert not np.allclose(embedding, keras.ops.convert_to_numpy(loaded.token_embedding.embeddings), atol=1e-2)

    gemma_lm = keras_gemma.GemmaCausalLM.from_preset(path, preprocessor=None)
    assert gemma_lm.preprocessor is None
    gemma_lm = keras_gemma.GemmaCausalLM.from_preset(path, sequence_length=64)
    assert gemma_lm.preprocessor.sequence_length == 64
    with pytest.raises(TypeError, match="cannot apply: sequence_length. It takes load_weights and dtype"):
        keras_gemma.GemmaBackbone.from_preset(path, sequence_length=64)


def test_directory_loads_with_transformers_logits(family_models, spm_proto, vocabulary_size, tmp_path):
    family, hf_model, _ = family_models
    save_hf(hf_model, tmp_path, spm_proto)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == family

    gemma_lm = keras_gemma.GemmaCausalLM.from_preset(str(tmp_path))
    assert_same_logits(gemma_lm, hf_model, vocabulary_size)
    assert gemma_lm.preprocessor.tokenizer.proto == spm_proto
    # generation_config.json's eos_token_id (1).
    assert gemma_lm.preprocessor.stop_tokens == ["<eos>"]


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3_text"])
def test_omitted_config_keys_take_transformers_defaults(family, spm_proto, vocabulary_size, tmp_path):
    """A Gemma 2 config.json without its soft-caps and query scale loaded with
    none (logits 3.9 off transformers', which fills its config defaults)."""
    hf_model, _ = helpers.hf_reference_and_ours(vocabulary_size, FAMILIES[family], seed=4, family=family)
    save_hf(hf_model, tmp_path, spm_proto)
    config = json.loads((tmp_path / "config.json").read_text())
    omitted = ["query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
               "sliding_window", "layer_types", "rms_norm_eps", "rope_theta", "rope_parameters"]
    for key in omitted:
        config.pop(key, None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    if family == "gemma2":
        assert (reference.config.attn_logit_softcapping, reference.config.final_logit_softcapping) == (50.0, 30.0)
    assert_same_logits(keras_gemma.GemmaCausalLM.from_preset(str(tmp_path)), reference.eval(), vocabulary_size)


def test_bidirectional_checkpoints_are_refused(gemma_dir, tmp_path):
    """EmbeddingGemma-style configs loaded as causal models (logits 5.5 off)."""
    path = copy_of(gemma_dir, tmp_path)
    edit_config(path, model_type="gemma3_text", use_bidirectional_attention=True)
    with pytest.raises(ValueError, match="config.json: The checkpoint attends in both directions.*embedding model"):
        keras_gemma.GemmaCausalLM.from_preset(str(path))


def test_sharded_directory(family_models, spm_proto, vocabulary_size, tmp_path):
    _, hf_model, _ = family_models
    save_hf(hf_model, tmp_path, spm_proto, max_shard_size="20KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    index = tmp_path / "model.safetensors.index.json"
    assert index.exists()
    assert_same_logits(keras_gemma.GemmaCausalLM.from_preset(str(tmp_path)), hf_model, vocabulary_size)
    damaged = json.loads(index.read_text())
    damaged["weight_map"] = sorted(damaged["weight_map"].values())
    index.write_text(json.dumps(damaged))
    with pytest.raises(ValueError, match="model.safetensors.index.json: weight_map must map tensor names to files"):
        keras_gemma.GemmaCausalLM.from_preset(str(tmp_path))


def test_a_stale_index_beside_model_safetensors_is_ignored(gemma_dir, spm_proto, vocabulary_size, tmp_path):
    """save_pretrained sharded, then unsharded into the same directory,
    leaves the old index and removes its shards: transformers loads
    model.safetensors; keras_gemma refused the directory (shards missing)."""
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(gemma_dir, attn_implementation="eager").eval()
    save_hf(hf_model, tmp_path, spm_proto, max_shard_size="20KB")
    hf_model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").exists() and not list(tmp_path.glob("model-*"))
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert_same_logits(keras_gemma.GemmaCausalLM.from_preset(str(tmp_path)), hf_model, vocabulary_size)


def test_bfloat16_weights(gemma_dir, spm_proto, vocabulary_size, tmp_path):
    load = transformers.AutoModelForCausalLM.from_pretrained
    load(gemma_dir, dtype=torch.bfloat16).save_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(spm_proto)
    rounded = load_file(tmp_path / "model.safetensors")
    assert {t.dtype for t in rounded.values()} == {torch.bfloat16}
    # The reference: the bf16-rounded weights, computed in float32.
    hf_model = load(gemma_dir, attn_implementation="eager")
    hf_model.load_state_dict({k: v.float() for k, v in rounded.items()}, strict=False)
    gemma_lm = keras_gemma.GemmaCausalLM.from_preset(str(tmp_path))
    assert gemma_lm.backbone.dtype_policy.variable_dtype == "float32"
    assert_same_logits(gemma_lm, hf_model, vocabulary_size)


def test_generation_config_sets_stop_tokens(gemma_dir, tmp_path):
    shutil.copytree(gemma_dir, tmp_path, dirs_exist_ok=True)
    # <end_of_turn> is id 6 in the test vocabulary.
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 6]}))
    gemma_lm = keras_gemma.GemmaCausalLM.from_preset(str(tmp_path))
    assert gemma_lm.preprocessor.stop_tokens == ["<eos>", "<end_of_turn>"]
    (tmp_path / "generation_config.json").unlink()
    assert keras_gemma.GemmaCausalLM.from_preset(str(tmp_path)).preprocessor.stop_tokens == ["<eos>"]


# The text model of a multimodal Gemma 3 file (4B and larger), as written by
# older (`language_model.model.*`) and newer (`model.language_model.*`)
# transformers. Like the real files, the text_config leaves out what
# transformers fills from Gemma3TextConfig's defaults (heads are given here
# to stay tiny): query_pre_attn_scalar (256, not head_dim 16), the RoPE bases
# (1M global, 10k local), and the layer pattern (every 6th layer global).
MULTIMODAL_LAYOUTS = {
    "language_model.": ("language_model.model.", "vision_tower.vision_model.", "multi_modal_projector."),
    "model.language_model.": ("model.language_model.", "model.vision_tower.vision_model.", "model.multi_modal_projector."),
}


def test_multimodal_gemma3_saved_by_transformers(spm_proto, vocabulary_size, tmp_path):
    """A tiny `Gemma3ForConditionalGeneration` (SigLIP tower included)
    written by the installed transformers' `save_pretrained`, its names and
    config as transformers writes them now; text logits equal its own."""
    config = transformers.Gemma3Config(
        text_config=dict(
            vocab_size=vocabulary_size + 64, hidden_size=32, intermediate_size=64,
            num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=1,
            head_dim=16, sliding_window=4, hidden_activation="gelu_pytorch_tanh",
        ),
        vision_config=dict(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, image_size=28, patch_size=14,
        ),
        mm_tokens_per_image=4,
    )
    config._attn_implementation = "eager"
    hf_model = helpers.randomize_(transformers.Gemma3ForConditionalGeneration(config), seed=5).eval()
    hf_model.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(spm_proto)

    gemma_lm = keras_gemma.GemmaCausalLM.from_preset(str(tmp_path))
    assert gemma_lm.backbone.count_params() == hf_model.model.language_model.num_parameters()
    assert_same_logits(gemma_lm, hf_model, vocabulary_size)


@pytest.mark.parametrize("layout", sorted(MULTIMODAL_LAYOUTS))
def test_multimodal_gemma3_directory(layout, spm_proto, vocabulary_size, tmp_path):
    text_prefix, vision_prefix, projector_prefix = MULTIMODAL_LAYOUTS[layout]
    text_config = dict(
        model_type="gemma3_text",
        # Embedding rows beyond the tokenizer's pieces (image tokens).
        vocab_size=vocabulary_size + 64,
        hidden_size=32, intermediate_size=64, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16,
        sliding_window=4, rope_scaling={"rope_type": "linear", "factor": 8.0},
    )
    hf_model = transformers.Gemma3ForCausalLM(
        transformers.Gemma3TextConfig(
            **{k: v for k, v in text_config.items() if k != "model_type"},
            hidden_activation="gelu_pytorch_tanh", attn_implementation="eager",
        )
    )
    helpers.randomize_(hf_model, seed=5).eval()
    tensors = {
        text_prefix + name.removeprefix("model."): value.contiguous()
        for name, value in hf_model.state_dict().items()
        if name != "lm_head.weight"  # Tied.
    }
    tensors[vision_prefix + "encoder.layers.0.mlp.fc1.weight"] = torch.ones(8, 4)
    tensors[projector_prefix + "mm_input_projection_weight"] = torch.ones(4, 32)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = {"model_type": "gemma3", "text_config": text_config, "vision_config": {}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "tokenizer.model").write_bytes(spm_proto)

    gemma_lm = keras_gemma.GemmaCausalLM.from_preset(str(tmp_path))
    backbone = gemma_lm.backbone
    assert backbone.vocabulary_size == vocabulary_size + 64
    assert backbone.query_scale == 256
    assert backbone.layer_types == ["sliding"] * 5 + ["global"]
    assert (backbone.rope_max_wavelength, backbone.local_rope_max_wavelength) == (1e6, 1e4)
    assert_same_logits(gemma_lm, hf_model, vocabulary_size)


def test_export_round_trip(family_models, spm_proto, vocabulary_size, tmp_path):
    family, _, ours = family_models
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor(
        keras_gemma.GemmaTokenizer(proto=spm_proto),
        stop_tokens=("<eos>", "<end_of_turn>"),
    )
    ours = keras_gemma.GemmaCausalLM(ours.backbone, preprocessor)
    path = tmp_path / "exported"
    hf.export_to_transformers(ours, path)

    assert sorted(os.listdir(path)) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.model",
        "tokenizer_config.json",
    ]
    # transformers' tokenizer starts with <bos>, as ours does.
    text = "hello world"
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    ids = hf_tokenizer(text)["input_ids"]
    assert ids == [2] + [int(i) for i in np.asarray(preprocessor.tokenizer(text))]
    # The chat markers are special: skipped when decoding without them (they
    # leaked into pipelines' text).
    chat = "<start_of_turn>model\nhello world<end_of_turn>"
    chat_ids = [int(i) for i in np.asarray(preprocessor.tokenizer(chat))]
    assert hf_tokenizer(chat, add_special_tokens=False)["input_ids"] == chat_ids
    assert hf_tokenizer.decode(chat_ids, skip_special_tokens=True) == "model\nhello world"
    assert hf_tokenizer.decode(chat_ids) == chat
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == family
    assert config["hidden_act"] == config["hidden_activation"] == "gelu_pytorch_tanh"
    assert (path / "tokenizer.model").read_bytes() == spm_proto
    generation_config = json.loads((path / "generation_config.json").read_text())
    assert generation_config["eos_token_id"] == [1, 6]

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    assert hf_model.config.model_type == family
    token_ids = helpers.random_token_ids(vocabulary_size, (2, SEQUENCE), seed=8)
    expected = our_logits(ours, token_ids)
    np.testing.assert_allclose(helpers.hf_logits(hf_model, token_ids), expected, atol=TOLERANCE, rtol=0)

    # And back into keras_gemma.
    restored = keras_gemma.GemmaCausalLM.from_preset(str(path))
    assert restored.preprocessor.stop_tokens == ["<eos>", "<end_of_turn>"]
    np.testing.assert_allclose(our_logits(restored, token_ids), expected, atol=TOLERANCE, rtol=0)


# The keys of transformers' Gemma configs that shape the computation: an
# exported config.json must give each (transformers' class defaults differ
# per family and version: Gemma 2's soft-caps, Gemma 3's context length).
EXPORTED_KEYS = {
    "gemma": [
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
        "hidden_act", "max_position_embeddings", "attention_bias", "tie_word_embeddings",
        "use_bidirectional_attention",
    ],
}
EXPORTED_KEYS["gemma2"] = [
    *EXPORTED_KEYS["gemma"], "hidden_activation", "query_pre_attn_scalar",
    "attn_logit_softcapping", "final_logit_softcapping", "sliding_window", "layer_types",
]
EXPORTED_KEYS["gemma3_text"] = EXPORTED_KEYS["gemma2"]
NO_SCALING = {"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
              "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}


@pytest.mark.parametrize(
    "family, rope_parameters, context_length",
    [
        ("gemma", None, 8192),
        ("gemma2", None, 8192),
        ("gemma3_text", NO_SCALING, 32768),  # As gemma3_270m and 1B.
        ("gemma3_text", GEMMA3["hf_extra"]["rope_parameters"], 131072),  # 4B and larger.
    ],
)
def test_exported_config_reads_back_in_transformers(family, rope_parameters, context_length, vocabulary_size, tmp_path):
    """The exported config.json gives transformers (AutoConfig) every
    architecture key of the model, max_position_embeddings included (it
    was missing: transformers took its class default, 131072 for a Gemma 3
    270M), rather than leaving them to transformers' defaults."""
    config = dict(FAMILIES[family])
    if rope_parameters is not None:
        config["hf_extra"] = {**config["hf_extra"], "rope_parameters": rope_parameters}
    reference = helpers.hf_config(vocabulary_size, family, **config)
    backbone = keras_gemma.GemmaBackbone(**hf.backbone_kwargs_from_hf_config(reference.to_dict()))
    exported = hf.hf_config_from_backbone(backbone)
    missing = [key for key in EXPORTED_KEYS[family] if key not in exported]
    assert not missing
    (tmp_path / "config.json").write_text(json.dumps(exported))
    loaded = transformers.AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is type(reference)
    assert loaded.max_position_embeddings == context_length
    assert loaded.use_bidirectional_attention is False  # (The class default: None.)
    for key in EXPORTED_KEYS[family]:
        if key not in ("max_position_embeddings", "use_bidirectional_attention"):
            assert getattr(loaded, key) == getattr(reference, key), key
    assert loaded.rope_parameters == reference.rope_parameters
    # And back: the same backbone.
    assert hf.backbone_kwargs_from_hf_config(loaded.to_dict()) == hf.backbone_kwargs_from_hf_config(reference.to_dict())


@pytest.mark.parametrize("use_query_key_norm", [False, True])  # Gemma 2's, 3's layout.
def test_export_with_no_sliding_layer_runs_in_transformers(use_query_key_norm, spm_proto, vocabulary_size, tmp_path):
    """The config said sliding_window None: transformers loaded it, then
    every forward pass failed (it builds the sliding mask anyway)."""
    backbone = keras_gemma.GemmaBackbone(
        vocabulary_size=vocabulary_size, **helpers.TINY_MQA, use_sandwich_norms=True,
        use_query_key_norm=use_query_key_norm,
    )
    ours = keras_gemma.GemmaCausalLM(backbone, keras_gemma.GemmaCausalLMPreprocessor(keras_gemma.GemmaTokenizer(proto=spm_proto)))
    hf.export_to_transformers(ours, tmp_path / "exported")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported", attn_implementation="eager")
    assert hf_model.config.layer_types == ["full_attention"] * backbone.num_layers
    token_ids = helpers.random_token_ids(vocabulary_size, (2, SEQUENCE), seed=8)
    expected = our_logits(ours, token_ids)
    np.testing.assert_allclose(helpers.hf_logits(hf_model, token_ids), expected, atol=TOLERANCE, rtol=0)
    restored = keras_gemma.GemmaCausalLM.from_preset(str(tmp_path / "exported"))
    assert restored.backbone.sliding_window is None
    np.testing.assert_allclose(our_logits(restored, token_ids), expected, atol=TOLERANCE, rtol=0)


def test_export_marks_only_the_special_pieces_the_vocabulary_has(tmp_path):
    """A vocabulary without <mask> or the chat markers: `token_to_id` gives
    <unk>'s id for them, and the export declared id 3 `<end_of_turn>`."""
    proto = helpers.train_sentencepiece(markers=())
    tokenizer = keras_gemma.GemmaTokenizer(proto=proto)
    assert tokenizer.piece_id("<end_of_turn>") is None
    backbone = keras_gemma.GemmaBackbone(vocabulary_size=tokenizer.vocabulary_size(), **helpers.TINY_MQA)
    gemma_lm = keras_gemma.GemmaCausalLM(backbone, keras_gemma.GemmaCausalLMPreprocessor(tokenizer))
    hf.export_to_transformers(gemma_lm, tmp_path / "exported")
    config = json.loads((tmp_path / "exported" / "tokenizer_config.json").read_text())
    declared = {int(i): t["content"] for i, t in config["added_tokens_decoder"].items()}
    assert declared == {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>"}
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "exported")
    assert hf_tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "<eos>", "<bos>", "<unk>"]


def test_bfloat16_export_keeps_bfloat16(spm_proto, vocabulary_size, tmp_path):
    gemma_lm = tiny_gemma_lm(spm_proto, vocabulary_size, dtype="bfloat16")
    hf.export_to_transformers(gemma_lm, tmp_path / "exported")
    tensors = load_file(tmp_path / "exported" / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    assert transformers.AutoConfig.from_pretrained(tmp_path / "exported").dtype == torch.bfloat16
    embedding = gemma_lm.backbone.token_embedding.embeddings
    np.testing.assert_array_equal(
        tensors["model.embed_tokens.weight"].float().numpy(),
        keras.ops.convert_to_numpy(keras.ops.cast(embedding, "float32")),
    )


def test_export_refuses_to_overwrite(spm_proto, vocabulary_size, tmp_path):
    ours = tiny_gemma_lm(spm_proto, vocabulary_size)
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        hf.export_to_transformers(ours, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]
    # An existing empty directory is fine.
    (tmp_path / "empty").mkdir()
    hf.export_to_transformers(ours, tmp_path / "empty")
    assert (tmp_path / "empty" / "model.safetensors").exists()
    # A dangling link is refused before anything is written.
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        hf.export_to_transformers(ours, tmp_path / "link")
    assert sorted(os.listdir(tmp_path)) == ["empty", "link", "notes.txt"]


def test_export_expands_the_home_directory(spm_proto, vocabulary_size, tmp_path, monkeypatch):
    """"~/exported" was written to a directory named "~" in the cwd."""
    (tmp_path / "home").mkdir()
    (tmp_path / "cwd").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path / "cwd")
    hf.export_to_transformers(tiny_gemma_lm(spm_proto, vocabulary_size), "~/exported")
    assert (tmp_path / "home" / "exported" / "model.safetensors").exists()
    assert os.listdir(tmp_path / "cwd") == []


def test_failed_export_leaves_nothing(spm_proto, vocabulary_size, tmp_path, monkeypatch):
    gemma_lm = tiny_gemma_lm(spm_proto, vocabulary_size)

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr("safetensors.numpy.save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        hf.export_to_transformers(gemma_lm, tmp_path / "exported")
    assert os.listdir(tmp_path) == []


def test_export_refuses_a_quantized_model(spm_proto, vocabulary_size, tmp_path):
    """Its kernels are int8 values without their scales: exported as they
    are, they would be a broken checkpoint."""
    gemma_lm = tiny_gemma_lm(spm_proto, vocabulary_size)
    gemma_lm.quantize("int8")
    with pytest.raises(ValueError, match="quantized .*before `quantize\\(\\)`"):
        hf.export_to_transformers(gemma_lm, tmp_path / "exported")
    assert os.listdir(tmp_path) == []


def test_export_refuses_what_transformers_cannot_compute(vocabulary_size, spm_proto, tmp_path):
    # Soft-caps without sandwich norms: no HF Gemma architecture has that.
    gemma_lm = tiny_gemma_lm(spm_proto, vocabulary_size, attention_logit_soft_cap=50.0)
    with pytest.raises(ValueError, match="model_type 'gemma'.*attention_logit_soft_cap"):
        hf.export_to_transformers(gemma_lm, tmp_path / "x")
    # Gemma 3's layout with an attention soft-cap: transformers' Gemma 3
    # ignores attn_logit_softcapping (the export's logits were 1.56 off).
    gemma_lm = tiny_gemma_lm(
        spm_proto, vocabulary_size, attention_logit_soft_cap=2.0, use_sandwich_norms=True,
        use_query_key_norm=True,
    )
    with pytest.raises(ValueError, match="model_type 'gemma3_text'.*attention_logit_soft_cap \\(2.0 -> None\\)"):
        hf.export_to_transformers(gemma_lm, tmp_path / "x")
    assert os.listdir(tmp_path) == []


def test_gemma3_attention_soft_cap_is_ignored_as_transformers_does(vocabulary_size):
    """transformers' Gemma 3 reads attn_logit_softcapping and never applies
    it; applied here, logits were 0.17 off transformers' and greedy text
    differed."""
    config = {**GEMMA3, "hf_extra": {**GEMMA3["hf_extra"], "attn_logit_softcapping": 2.0}}
    with pytest.warns(UserWarning, match="attn_logit_softcapping=2.0 for gemma3_text, which transformers ignores"):
        hf_model, gemma_lm = helpers.hf_reference_and_ours(vocabulary_size, config, seed=8, family="gemma3_text")
    assert gemma_lm.backbone.attention_logit_soft_cap is None
    token_ids = helpers.random_token_ids(vocabulary_size, (2, 12), seed=9)
    np.testing.assert_allclose(our_logits(gemma_lm, token_ids), helpers.hf_logits(hf_model, token_ids), atol=1e-4, rtol=0)


# === Bad files: each error names the file and the tensor or key. ===


def copy_of(gemma_dir, tmp_path):
    path = tmp_path / "checkpoint"
    shutil.copytree(gemma_dir, path)
    return path


def rewrite_weights(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_truncated_safetensors(gemma_dir, tmp_path):
    path = copy_of(gemma_dir, tmp_path)
    weights = path / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(ValueError, match=f"{re.escape(str(weights))}.*truncated or corrupt"):
        keras_gemma.GemmaCausalLM.from_preset(str(path))


def rewrite_header(weights, edit, junk=b""):
    """`edit` the JSON header of a safetensors file in place; `junk` is
    appended to the data."""
    data = weights.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    edit(header["model.norm.weight"], header)
    encoded = json.dumps(header).encode()
    weights.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data[8 + size:] + junk)


def move_to_start(norm, header):  # Its bytes alias another tensor's.
    start, end = norm["data_offsets"]
    norm["data_offsets"] = [0, end - start]


# The safetensors library refuses these headers; keras_gemma's reader took
# them: negative offsets read the header's JSON text as weights, a huge shape
# was a MemoryError, a shape string a TypeError.
@pytest.mark.parametrize(
    "edit, junk, message",
    [
        (lambda norm, _: norm.update(data_offsets=[-128, 0]), b"", r"data_offsets \[-128, 0\], not a list of whole numbers >= 0"),
        (lambda norm, _: norm.update(data_offsets=[float(v) for v in norm["data_offsets"]]), b"", r"data_offsets \[[\d.]+, [\d.]+\], not a list"),
        (lambda norm, _: norm.update(shape=[-8, -4]), b"", r"shape \[-8, -4\], not a list of whole numbers >= 0"),
        (lambda norm, _: norm.update(shape="32"), b"", "shape '32', not a list"),
        (lambda norm, _: norm.update(shape=[10**7, 10**7]), b"", r"tensor 'model.norm.weight' has \d+ bytes for shape \[10000000, 10000000\]"),
        (move_to_start, b"", "overlaps another or leaves a gap"),
        (lambda norm, _: None, b"junk", r"its tensors end at byte \d+ of \d+"),
    ],
    ids=["negative offsets", "float offsets", "negative shape", "string shape", "huge shape", "overlap", "trailing junk"],
)
def test_safetensors_headers_that_lie_are_refused(gemma_dir, tmp_path, edit, junk, message):
    path = copy_of(gemma_dir, tmp_path)
    rewrite_header(path / "model.safetensors", edit, junk)
    with pytest.raises(ValueError, match=f"model.safetensors is not a readable safetensors file \\(.*{message}.*download it again"):
        keras_gemma.GemmaCausalLM.from_preset(str(path))


def test_a_tensor_stored_in_two_shards_is_refused(gemma_dir, tmp_path):
    """The shard read last silently won."""
    path = copy_of(gemma_dir, tmp_path)
    tensors = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    name, first, second = "model.norm.weight", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    save_file(tensors, path / first, metadata={"format": "pt"})
    save_file({name: tensors[name] + 1}, path / second, metadata={"format": "pt"})
    weight_map = {**{key: first for key in tensors}, name: second}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(ValueError, match=f"Tensor '{name}' is stored twice, in .*{first} and .*{second}"):
        keras_gemma.GemmaCausalLM.from_preset(str(path))


def test_tensor_with_wrong_shape(gemma_dir, tmp_path):
    path = copy_of(gemma_dir, tmp_path)
    name = "model.layers.1.mlp.up_proj.weight"
    rewrite_weights(path, lambda t: t.update({name: t[name][:, :-1].contiguous()}))
    with pytest.raises(ValueError, match=rf"model.safetensors: tensor '{name}' has shape \(64, 31\)"):
        keras_gemma.GemmaCausalLM.from_preset(str(path))


def test_missing_tensor(gemma_dir, tmp_path):
    path = copy_of(gemma_dir, tmp_path)
    name = "model.layers.1.self_attn.k_proj.weight"
    rewrite_weights(path, lambda t: t.pop(name))
    with pytest.raises(ValueError, match=f"model.safetensors is missing tensor '{name}': the file is incomplete"):
        keras_gemma.GemmaCausalLM.from_preset(str(path))


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))
    return config


def test_a_config_with_the_wrong_number_of_heads(gemma_dir, tmp_path):
    """Splitting q_proj into 3 heads failed with NumPy's "cannot reshape
    array of size 2048 into shape (3,16,newaxis)", naming no file."""
    path = copy_of(gemma_dir, tmp_path)
    config = json.loads((path / "config.json").read_text())
    edit_config(path, num_attention_heads=config["num_attention_heads"] - 1)
    with pytest.raises(ValueError, match=r"model.safetensors: tensor 'model.layers.0.self_attn.q_proj.weight' has shape .* which does not fit"):
        keras_gemma.GemmaCausalLM.from_preset(str(path))


def test_tensors_the_config_does_not_use(gemma_dir, tmp_path):
    """A config one layer short of the file loaded (wrong logits)."""
    path = copy_of(gemma_dir, tmp_path)
    config = json.loads((path / "config.json").read_text())
    last = config["num_hidden_layers"] - 1
    edit_config(path, num_hidden_layers=last)
    with pytest.raises(ValueError, match=rf"model.safetensors stores \d+ tensor\(s\) that the model its config describes does not use: 'model.layers.{last}\."):
        keras_gemma.GemmaCausalLM.from_preset(str(path))


def test_a_config_with_more_layers_than_the_file_is_refused_before_building(gemma_dir, tmp_path, monkeypatch):
    """2000 layers over a 2-layer file built for 22 s, then a RecursionError."""
    from keras_gemma.models import gemma_backbone

    path = copy_of(gemma_dir, tmp_path)
    stored = json.loads((path / "config.json").read_text())["num_hidden_layers"]
    edit_config(path, num_hidden_layers=2000)
    monkeypatch.setattr(gemma_backbone, "GemmaDecoderBlock", None)  # Building would fail otherwise.
    with pytest.raises(ValueError, match=f"config describes 2000 layers, but the file stores weights of {stored}: the file is incomplete"):
        keras_gemma.GemmaCausalLM.from_preset(str(path))


def test_output_heads(gemma_dir, vocabulary_size, tmp_path):
    """An output head tied to the embedding but saved anyway is ignored, as
    transformers ignores it; an untied one is refused (it loaded, and the
    logits were the embedding's: up to 21 off transformers')."""
    path = copy_of(gemma_dir, tmp_path)
    rewrite_weights(path, lambda t: t.update({"lm_head.weight": torch.randn_like(t["model.embed_tokens.weight"])}))
    token_ids = helpers.random_token_ids(vocabulary_size, (1, 8))
    np.testing.assert_array_equal(
        our_logits(keras_gemma.GemmaCausalLM.from_preset(str(path)), token_ids),
        our_logits(keras_gemma.GemmaCausalLM.from_preset(str(gemma_dir)), token_ids),
    )
    edit_config(path, tie_word_embeddings=False)
    with pytest.raises(ValueError, match="output head of its own"):
        keras_gemma.GemmaCausalLM.from_preset(str(path))


def test_quantized_checkpoints_are_refused(gemma_dir, tmp_path):
    """bitsandbytes int8 codes were read as floats (logits 4.5 off)."""
    path = copy_of(gemma_dir, tmp_path)
    edit_config(path, quantization_config={"quant_method": "bitsandbytes", "load_in_8bit": True})
    with pytest.raises(ValueError, match=r"quantized \(bitsandbytes\).*float16/bfloat16/float32 release"):
        keras_gemma.GemmaCausalLM.from_preset(str(path))


def rope_config(model_type="gemma3_text", **rope):
    return dict(
        model_type=model_type, num_hidden_layers=2, hidden_size=32, intermediate_size=64,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, vocab_size=300, **rope,
    )


def rope_parameters(full, sliding=None):  # transformers 5's per-layer-type form.
    return {
        "full_attention": {"rope_theta": 1e6, **full},
        "sliding_attention": {"rope_theta": 1e4, **(sliding or {"rope_type": "default"})},
    }


@pytest.mark.parametrize(
    "config, factor",
    [
        (rope_config(rope_parameters=rope_parameters({"rope_type": "linear", "factor": 8.0})), 8.0),
        (rope_config(rope_scaling={"type": "linear", "factor": 4.0}), 4.0),
        (rope_config(rope_parameters=rope_parameters({"rope_type": "default"})), 1.0),
    ],
)
def test_rope_scaling_is_read(config, factor):
    assert hf.backbone_kwargs_from_hf_config(config)["rope_scaling_factor"] == factor


@pytest.mark.parametrize(
    "config, message",
    [
        # These loaded with no scaling at all (wrong positions).
        (rope_config(rope_parameters=rope_parameters({"rope_type": "yarn", "factor": 8.0})), "Unsupported RoPE scaling .*yarn"),
        (rope_config(rope_parameters=rope_parameters({"rope_type": "dynamic", "factor": 2.0})), "Unsupported RoPE scaling .*dynamic"),
        (rope_config(rope_parameters=rope_parameters({}, {"rope_type": "linear", "factor": 4.0})), "scaling of the sliding layers"),
        (rope_config("gemma", rope_scaling={"rope_type": "linear", "factor": 2.0}), "in a gemma checkpoint"),
        (rope_config("gemma2", rope_scaling={"rope_type": "linear", "factor": 2.0}), "in a gemma2 checkpoint"),
        (rope_config(rope_scaling={"rope_type": "yarn", "factor": 8.0}), "Unsupported RoPE scaling .*yarn"),
    ],
)
def test_unsupported_rope_scaling_is_refused(config, message):
    with pytest.raises(ValueError, match=message):
        hf.backbone_kwargs_from_hf_config(config)


def test_unknown_model_type(gemma_dir, tmp_path):
    path = copy_of(gemma_dir, tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match="config.json: Unknown architecture model_type='llama'"):
        keras_gemma.GemmaCausalLM.from_preset(str(path))


def test_unsupported_layer_type(gemma_dir, tmp_path):
    path = copy_of(gemma_dir, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="gemma3_text", layer_types=["sliding_attention", "chunked_attention"])
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json: layer_types has 'chunked_attention', which keras_gemma does not support"):
        keras_gemma.GemmaCausalLM.from_preset(str(path))


# Integer tensors (quantized codes) were read as floats.
@pytest.mark.parametrize("dtype, stored", [("float8_e4m3fn", "F8_E4M3"), ("int8", "I8")])
def test_unsupported_tensor_dtype(gemma_dir, tmp_path, dtype, stored):
    """A readable file in a dtype we do not read is not called corrupt."""
    path = copy_of(gemma_dir, tmp_path)
    name = "model.norm.weight"
    rewrite_weights(path, lambda t: t.update({name: t[name].to(getattr(torch, dtype))}))
    with pytest.raises(ValueError, match=f"tensor '{name}' is stored as {stored}, which keras_gemma does not read"):
        keras_gemma.GemmaCausalLM.from_preset(str(path))


def test_missing_config_key(gemma_dir, tmp_path):
    path = copy_of(gemma_dir, tmp_path)
    config = json.loads((path / "config.json").read_text())
    del config["num_hidden_layers"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json lacks the key 'num_hidden_layers'"):
        keras_gemma.GemmaCausalLM.from_preset(str(path))


@pytest.mark.parametrize(
    "file, content, message",
    [
        # config.json changes.
        ("config.json", dict(model_type="gemma3", text_config=None), "config.json: text_config is None, not a JSON object"),
        ("config.json", dict(quantization_config="bnb"), "config.json: quantization_config is 'bnb', not a JSON object"),
        ("config.json", dict(model_type="gemma3_text", sliding_window_pattern=0), "config.json: sliding_window_pattern is 0, not a whole number >= 1"),
        ("config.json", dict(num_attention_heads=0, head_dim=None), "config.json: num_attention_heads is 0, not a whole number >= 1"),
        ("config.json", dict(model_type="gemma3_text", rope_parameters=[1]), r"config.json: rope_parameters is \[1\], not a JSON object"),
        ("config.json", dict(rms_norm_eps="1e-6"), "config.json: rms_norm_eps is '1e-6', not a number"),
        ("config.json", dict(model_type="gemma2", layer_types=[["full_attention"]]), r"config.json: layer_types has \['full_attention'\], which keras_gemma does not support"),
        ("generation_config.json", {"eos_token_id": "<eos>"}, r"generation_config.json: eos_token_id \['<eos>'\] is not a token id of .*tokenizer.model"),
        ("generation_config.json", [1], "generation_config.json does not hold a JSON object; the file is damaged"),
        ("generation_config.json", b'{"eos_token_id": "\xff"}', "generation_config.json is not valid JSON: 'utf-8' codec"),
        # (Without model.safetensors, which is read in preference.)
        ("model.safetensors.index.json", [], "model.safetensors.index.json does not hold a JSON object"),
        ("model.safetensors.index.json", {"weight_map": {"model.norm.weight": 1}}, "model.safetensors.index.json: weight_map must map tensor names to files"),
    ],
)
def test_damaged_metadata_is_a_clear_error(gemma_dir, tmp_path, file, content, message):
    """Each was a bare AttributeError, TypeError, ZeroDivisionError or
    UnicodeDecodeError, naming no file."""
    path = copy_of(gemma_dir, tmp_path)
    if file == "config.json":
        edit_config(path, **content)
    else:
        (path / file).write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    if file == "model.safetensors.index.json":
        (path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=message):
        keras_gemma.GemmaCausalLM.from_preset(str(path))


@pytest.mark.parametrize("bug", [AttributeError, TypeError, ZeroDivisionError])
def test_our_own_errors_reading_a_config_are_not_blamed_on_the_file(monkeypatch, bug):
    """A last-resort handler reported them as a damaged config.json, which
    hid bugs of ours; a damaged file's values fail `_get`'s typed checks."""

    def broken(config):
        raise bug("a bug of ours")

    monkeypatch.setattr(hf, "_rope", broken)
    config = dict(model_type="gemma", num_hidden_layers=2, hidden_size=32, intermediate_size=64)
    with pytest.raises(bug, match="a bug of ours"):
        hf.backbone_kwargs_from_config(config, "config.json")


class _Payload:
    """Creates a file when unpickled: proof that unpickling ran code."""

    marker = None

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_weights_are_refused_unread(gemma_dir, tmp_path):
    path = copy_of(gemma_dir, tmp_path)
    (path / "model.safetensors").unlink()
    payload = _Payload()
    payload.marker = str(tmp_path / "unpickled")
    with open(path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.norm.weight": payload}, f)
    with pytest.raises(ValueError, match="pytorch_model.bin is a pickle file.*safetensors"):
        keras_gemma.GemmaCausalLM.from_preset(str(path))
    assert not (tmp_path / "unpickled").exists()


def test_missing_tokenizer(gemma_dir, vocabulary_size, tmp_path):
    """Only what needs a tokenizer needs the file: the backbone, and the task
    without a preprocessor, failed too."""
    path = copy_of(gemma_dir, tmp_path)
    (path / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="has no tokenizer.model"):
        keras_gemma.GemmaCausalLM.from_preset(str(path))
    with pytest.raises(FileNotFoundError, match="has no tokenizer.model"):
        keras_gemma.GemmaTokenizer.from_preset(str(path))
    token_ids = helpers.random_token_ids(vocabulary_size, (1, 8))
    expected = our_logits(keras_gemma.GemmaCausalLM.from_preset(str(gemma_dir)), token_ids)
    gemma_lm = keras_gemma.GemmaCausalLM.from_preset(str(path), preprocessor=None)
    assert gemma_lm.preprocessor is None
    np.testing.assert_array_equal(our_logits(gemma_lm, token_ids), expected)
    backbone = keras_gemma.GemmaBackbone.from_preset(str(path))
    np.testing.assert_array_equal(our_logits(keras_gemma.GemmaCausalLM(backbone), token_ids), expected)


TOKENIZER_TEXTS = [
    "hello world", "The  quick   brown fox\n\njumps", "<start_of_turn>user\nhi<end_of_turn>\n",
    "Emoji 😀 and é, 日本語", "  leading and trailing  ", "digits 12345 and tabs\t\tx", "<bos> typed",
]


def transformers_saved_tokenizer(spm_proto, path):
    """What transformers 5 saves for Gemma's tokenizer: tokenizer.json, no
    tokenizer.model. Returns the transformers tokenizer."""
    source = path.parent / f"{path.name}_source"
    source.mkdir()
    (source / "tokenizer.model").write_bytes(spm_proto)
    (source / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GemmaTokenizer"}))
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    hf_tokenizer.save_pretrained(path)
    assert (path / "tokenizer.json").exists() and not (path / "tokenizer.model").exists()
    return hf_tokenizer


@pytest.fixture(scope="module")
def bpe_proto():
    return helpers.train_sentencepiece(vocab_size=340, model_type="bpe")  # Fits gemma_dir's 357 rows.


def test_tokenizer_json_alone_is_rebuilt_as_sentencepiece(gemma_dir, bpe_proto, tmp_path):
    """An HF directory saved by transformers 5 (fine-tuned after
    export_to_transformers, say) has no tokenizer.model: it failed."""
    import sentencepiece

    path = copy_of(gemma_dir, tmp_path)
    (path / "tokenizer.model").unlink()
    transformers_saved_tokenizer(bpe_proto, path)
    gemma_lm = keras_gemma.GemmaCausalLM.from_preset(str(path))
    tokenizer, reference = gemma_lm.preprocessor.tokenizer, sentencepiece.SentencePieceProcessor(model_proto=bpe_proto)
    assert tokenizer.vocabulary_size() == reference.vocab_size()
    for text in TOKENIZER_TEXTS:
        ids = [int(i) for i in np.asarray(tokenizer(text))]
        assert ids == reference.encode(text), text
        assert tokenizer.detokenize(np.array(ids, "int32")) == text

    # One that is not Gemma's (a prepended space) is refused, not misread.
    tokenizer_json = json.loads((path / "tokenizer.json").read_text())
    tokenizer_json["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"}, tokenizer_json["normalizer"]]}
    (path / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    with pytest.raises(ValueError, match="tokenizer.json: its normalizer .* is not Gemma's"):
        keras_gemma.GemmaTokenizer.from_preset(str(path))


def test_tokens_a_fine_tune_added_are_read(gemma_dir, bpe_proto, vocabulary_size, tmp_path):
    """Added tokens (ChatML markers, say) beyond tokenizer.model's pieces
    were ignored: other token ids than transformers', and the embedding rows
    for them could not be detokenized."""
    import sentencepiece

    path = copy_of(gemma_dir, tmp_path)
    (path / "tokenizer.model").unlink()
    hf_tokenizer = transformers_saved_tokenizer(bpe_proto, path)
    hf_tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    hf_tokenizer.save_pretrained(path)
    (path / "tokenizer.model").write_bytes(bpe_proto)  # As the original release had it.
    size = sentencepiece.SentencePieceProcessor(model_proto=bpe_proto).vocab_size()
    assert len(hf_tokenizer) == size + 2 <= vocabulary_size

    tokenizer = keras_gemma.GemmaTokenizer.from_preset(str(path))
    assert tokenizer.vocabulary_size() == size + 2
    text = "<|im_start|>user\nhello world<|im_end|>"
    ids = [int(i) for i in np.asarray(tokenizer(text))]
    assert ids == hf_tokenizer.encode(text, add_special_tokens=False)
    assert ids[0] == size and ids[-1] == size + 1
    assert tokenizer.detokenize(np.array(ids, "int32")) == text

    tokenizer_json = json.loads((path / "tokenizer.json").read_text())
    next(t for t in tokenizer_json["added_tokens"] if t["id"] == size)["id"] = size + 5
    (path / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    with pytest.raises(ValueError, match=rf"adds tokens with ids \[{size + 1}, {size + 5}\], which do not follow the {size} pieces of tokenizer.model"):
        keras_gemma.GemmaTokenizer.from_preset(str(path))


@pytest.fixture
def hub_resolves(monkeypatch):
    """The Hub's host name resolves (it does not on machines offline)."""
    import socket
    import urllib.parse

    from huggingface_hub import constants

    resolve = socket.getaddrinfo

    hub_host = urllib.parse.urlparse(constants.ENDPOINT).hostname  # (HF_ENDPOINT may name another.)

    def getaddrinfo(host, *args, **kwargs):
        if host == hub_host:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", 443))]
        return resolve(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.mark.usefixtures("hub_resolves")
def test_hf_hub_handle_downloads_through_huggingface_hub(gemma_dir, vocabulary_size, monkeypatch):
    """hf://org/repo in transformers format: config via hf_hub_download, the
    weights via snapshot_download (served here from a local directory)."""
    import huggingface_hub

    calls = []

    def hf_hub_download(repo_id, filename, **kwargs):
        calls.append(("file", repo_id, filename))
        return str(gemma_dir / filename)

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append(("snapshot", repo_id, tuple(allow_patterns)))
        return str(gemma_dir)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    gemma_lm = keras_gemma.GemmaCausalLM.from_preset("hf://google/tiny-gemma")
    assert ("file", "google/tiny-gemma", "config.json") in calls
    assert any(c[0] == "snapshot" and "*.safetensors" in c[2] for c in calls)
    reference = keras_gemma.GemmaCausalLM.from_preset(str(gemma_dir))
    token_ids = helpers.random_token_ids(vocabulary_size, (1, 6))
    np.testing.assert_array_equal(our_logits(gemma_lm, token_ids), our_logits(reference, token_ids))


@pytest.mark.usefixtures("hub_resolves")
def test_hub_checkpoint_the_config_rules_out_is_not_downloaded(gemma_dir, tmp_path, monkeypatch):
    """A quantized hf:// repo was refused only after its weights downloaded."""
    import huggingface_hub

    path = copy_of(gemma_dir, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes"}
    (path / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo_id, filename, **kw: str(path / filename))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **kw: pytest.fail("downloaded"))
    with pytest.raises(ValueError, match=r"hf://google/tiny-gemma/config.json: The checkpoint is quantized \(bitsandbytes\)"):
        keras_gemma.GemmaCausalLM.from_preset("hf://google/tiny-gemma")


def test_kaggle_transformers_variant_downloads_through_kagglehub(gemma_dir, vocabulary_size, monkeypatch):
    """Kaggle's Gemma pages also hold transformers-format variants; their
    handles failed with "not a Keras preset config"."""
    import kagglehub

    calls = []

    def model_download(handle, path=None, **kwargs):
        calls.append((handle, path))
        return str(gemma_dir / path) if path else str(gemma_dir)

    monkeypatch.setattr(kagglehub, "model_download", model_download)
    gemma_lm = keras_gemma.GemmaCausalLM.from_preset("kaggle://google/gemma/transformers/tiny/1")
    assert ("google/gemma/transformers/tiny/1", None) in calls  # The whole variant.
    reference = keras_gemma.GemmaCausalLM.from_preset(str(gemma_dir))
    token_ids = helpers.random_token_ids(vocabulary_size, (1, 6))
    np.testing.assert_array_equal(our_logits(gemma_lm, token_ids), our_logits(reference, token_ids))


def hub_offline():  # What huggingface_hub raises offline, a FileNotFoundError.
    from huggingface_hub.errors import LocalEntryNotFoundError

    return LocalEntryNotFoundError("cannot find the requested files in the local cache")


@pytest.mark.usefixtures("hub_resolves")
@pytest.mark.parametrize("error", [lambda: ConnectionError("Failed to resolve 'huggingface.co'"), hub_offline])
def test_unreachable_hf_hub_is_a_clear_error(monkeypatch, error):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise error()

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    # Not KerasHub's "`config.json` doesn't exist" (offline, huggingface_hub
    # raises a FileNotFoundError).
    match = "(?s)Could not download 'hf://google/gemma-2b'.*could not be reached.*Check the network connection.*local directory"
    with pytest.raises(OSError, match=match):
        keras_gemma.GemmaCausalLM.from_preset("hf://google/gemma-2b")


def test_a_hub_host_that_does_not_resolve_fails_at_once(monkeypatch):
    """Offline, huggingface_hub retried five times (~23 s, a log line each)
    before failing; with HF_HUB_OFFLINE set, the advice was the network."""
    import socket

    import huggingface_hub
    from huggingface_hub import constants

    def no_such_host(host, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    asked = []
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: asked.append(a))
    for load in (keras_gemma.GemmaCausalLM.from_preset, keras_gemma.GemmaTokenizer.from_preset):
        with pytest.raises(OSError, match="(?s)could not be reached \\(offline\\?\\): .*Name or service not known.*Check the network"):
            load("hf://google/gemma-2b")
    assert not asked  # Not tried.
    # Behind a proxy (which resolves names itself) the download is tried.
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")

    def download_offline(*args, **kwargs):
        asked.append(args)
        raise hub_offline()

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download_offline)
    with pytest.raises(OSError, match="could not be reached"):
        keras_gemma.GemmaCausalLM.from_preset("hf://google/gemma-2b")
    assert asked
    monkeypatch.delenv("HTTPS_PROXY")
    # A model in huggingface_hub's cache: it reads it from there at once.
    asked.clear()
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: "/cache/config.json")
    with pytest.raises(OSError, match="could not be reached"):
        keras_gemma.GemmaCausalLM.from_preset("hf://google/gemma-2b")
    assert asked
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: (_ for _ in ()).throw(hub_offline()))
    with pytest.raises(OSError, match="(?s)HF_HUB_OFFLINE is set, and huggingface_hub's cache does not hold it.*Unset HF_HUB_OFFLINE"):
        keras_gemma.GemmaCausalLM.from_preset("hf://google/gemma-2b")


@pytest.mark.usefixtures("hub_resolves")
def test_gated_hf_model_says_how_to_get_access(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def gated(*args, **kwargs):
        error = GatedRepoError.__new__(GatedRepoError)  # Its __init__ wants an HTTP response.
        Exception.__init__(error, "401 Client Error. Cannot access gated repo for url https://huggingface.co/...")
        raise error

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", gated)
    match = "(?s)Could not download 'hf://google/gemma-2b'.*gated repo.*spelling.*hf auth login.*accept the license.*local directory"
    with pytest.raises(OSError, match=match) as raised:
        keras_gemma.GemmaCausalLM.from_preset("hf://google/gemma-2b")
    assert "kaggle" not in str(raised.value).lower()
