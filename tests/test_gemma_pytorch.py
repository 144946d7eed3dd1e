"""gemma_pytorch `.ckpt` files (float and int8) against transformers."""

import keras
import numpy as np
import pytest
import torch
import transformers

import keras_gemma
from keras_gemma.checkpoints import gemma_pytorch
from keras_gemma.checkpoints.importer import build_causal_lm
from tests import helpers
from tests.test_families import GEMMA2
from tests.test_families import GEMMA3

TOLERANCE = 1e-4
SEQUENCE = 12
FAMILIES = {"gemma": helpers.TINY_MQA, "gemma2": GEMMA2, "gemma3_text": GEMMA3}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def hf_model(request, vocabulary_size):
    hf_model, _ = helpers.hf_reference_and_ours(
        vocabulary_size, FAMILIES[request.param], seed=4, family=request.param
    )
    return hf_model


@pytest.fixture(scope="module")
def gemma_model(vocabulary_size):
    hf_model, _ = helpers.hf_reference_and_ours(vocabulary_size, helpers.TINY_MQA, seed=6)
    return hf_model


def gemma_pytorch_state(hf_state, config):
    """HF tensors renamed and fused as gemma_pytorch stores them."""
    state = {"freqs_cis": torch.polar(torch.ones(8, 8), torch.ones(8, 8))}  # A buffer to skip.
    for name, value in hf_state.items():
        if name == "lm_head.weight":
            continue  # Tied to the embedding.
        if name == "model.embed_tokens.weight":
            state["embedder.weight"] = value
        elif ".self_attn.q_proj." in name:
            prefix = name.split("q_proj")[0]
            state[prefix + "qkv_proj.weight"] = torch.cat(
                [hf_state[prefix + p + "_proj.weight"] for p in "qkv"]
            )
        elif ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            continue
        else:
            state[name.replace("q_norm", "query_norm").replace("k_norm", "key_norm")] = value
    assert sum(".qkv_proj." in n for n in state) == config.num_hidden_layers
    return state


def save_checkpoint(state, path, spm_proto, config=None, **save_kwargs):
    path.parent.mkdir(exist_ok=True)
    torch.save({"model_state_dict": state}, path, **save_kwargs)
    (path.parent / "tokenizer.model").write_bytes(spm_proto)
    if config is not None:
        config.to_json_file(path.parent / "config.json")
    return str(path)


def assert_same_logits(gemma_lm, hf_model, vocabulary_size):
    token_ids = helpers.random_token_ids(vocabulary_size, (2, SEQUENCE), seed=9)
    logits = keras.ops.convert_to_numpy(
        gemma_lm({"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)})
    )
    np.testing.assert_allclose(
        logits, helpers.hf_logits(hf_model, token_ids), atol=TOLERANCE, rtol=0
    )


def test_checkpoint_with_config_json(hf_model, spm_proto, vocabulary_size, tmp_path):
    state = gemma_pytorch_state(hf_model.state_dict(), hf_model.config)
    path = save_checkpoint(state, tmp_path / "model.ckpt", spm_proto, hf_model.config)
    gemma_lm = keras_gemma.GemmaCausalLM.from_preset(path)
    assert gemma_lm.preprocessor.tokenizer.proto == spm_proto
    assert_same_logits(gemma_lm, hf_model, vocabulary_size)


def test_checkpoint_in_torchs_legacy_format(hf_model, spm_proto, vocabulary_size, tmp_path):
    """Files saved without the zip format cannot be memory-mapped: they
    were refused ("mmap can only be used with files saved with ...")."""
    state = gemma_pytorch_state(hf_model.state_dict(), hf_model.config)
    path = save_checkpoint(
        state, tmp_path / "model.ckpt", spm_proto, hf_model.config, _use_new_zipfile_serialization=False
    )
    assert_same_logits(keras_gemma.GemmaCausalLM.from_preset(path), hf_model, vocabulary_size)
    with open(path, "wb") as f:  # An error page saved in its place.
        f.write(b"<!DOCTYPE html><html>Not Found</html>")
    with pytest.raises(ValueError, match="model.ckpt is not a readable PyTorch checkpoint"):
        keras_gemma.GemmaCausalLM.from_preset(path)


def test_file_suffixes_in_any_case(gemma_model, spm_proto, vocabulary_size, tmp_path):
    """`MODEL.CKPT` was "unknown checkpoint file type" (.GGUF was read); a
    lone safetensors file is told to come with its directory."""
    state = gemma_pytorch_state(gemma_model.state_dict(), gemma_model.config)
    path = save_checkpoint(state, tmp_path / "MODEL.CKPT", spm_proto, gemma_model.config)
    assert_same_logits(keras_gemma.GemmaCausalLM.from_preset(path), gemma_model, vocabulary_size)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown checkpoint file type.*pass the directory that holds them"):
        keras_gemma.GemmaCausalLM.from_preset(str(tmp_path / "model.safetensors"))


def test_a_config_with_fewer_layers_than_the_file_is_refused(gemma_model, spm_proto, tmp_path):
    state = gemma_pytorch_state(gemma_model.state_dict(), gemma_model.config)
    config = gemma_model.config.to_dict()
    config["num_hidden_layers"] -= 1
    path = save_checkpoint(state, tmp_path / "model.ckpt", spm_proto)
    checkpoint = gemma_pytorch.read_checkpoint(path, config=config)
    with pytest.raises(ValueError, match=r"model.ckpt stores \d+ tensor\(s\) .* does not use: 'model.layers.1\."):
        build_causal_lm(checkpoint)


def test_gemma3_multimodal_checkpoint_loads_its_text_model(spm_proto, vocabulary_size, tmp_path):
    """Gemma3ForMultimodalLM files (4B and up) were refused: their embedder
    is `text_token_embedder` and they hold a vision tower."""
    hf_model, _ = helpers.hf_reference_and_ours(vocabulary_size, GEMMA3, seed=4, family="gemma3_text")
    state = gemma_pytorch_state(hf_model.state_dict(), hf_model.config)
    state["text_token_embedder.weight"] = state.pop("embedder.weight")
    state["siglip_vision_model.encoder.0.weight"] = torch.ones(4, 4)
    state["mm_input_projection.weight"] = torch.ones(4, 64)
    state["mm_soft_embedding_norm.weight"] = torch.ones(4)
    path = save_checkpoint(state, tmp_path / "model.ckpt", spm_proto, hf_model.config)
    assert_same_logits(keras_gemma.GemmaCausalLM.from_preset(path), hf_model, vocabulary_size)


def test_config_argument(gemma_model, spm_proto, vocabulary_size, tmp_path):
    state = gemma_pytorch_state(gemma_model.state_dict(), gemma_model.config)
    path = save_checkpoint(state, tmp_path / "model.ckpt", spm_proto)
    checkpoint = gemma_pytorch.read_checkpoint(path, config=gemma_model.config.to_dict())
    assert_same_logits(build_causal_lm(checkpoint), gemma_model, vocabulary_size)


def test_config_from_the_catalog(gemma_model, spm_proto, vocabulary_size, tmp_path, monkeypatch):
    state = gemma_pytorch_state(gemma_model.state_dict(), gemma_model.config)
    path = save_checkpoint(state, tmp_path / "model.ckpt", spm_proto)
    tiny = dict(vocabulary_size=vocabulary_size, **helpers.TINY_MQA)
    wider = {**tiny, "hidden_dim": 64}
    monkeypatch.setattr(gemma_pytorch, "catalog", lambda: {
        "tiny_en": {"config": tiny}, "tiny_instruct_en": {"config": tiny},
        "wider_en": {"config": wider},
    })
    assert_same_logits(keras_gemma.GemmaCausalLM.from_preset(path), gemma_model, vocabulary_size)

    monkeypatch.setattr(gemma_pytorch, "catalog", lambda: {"wider_en": {"config": wider}})
    with pytest.raises(ValueError, match=r"model.ckpt: cannot tell .* 32, 2 layers.*config.json next to the"):
        keras_gemma.GemmaCausalLM.from_preset(path)


def quantize_rows(weight):
    """Per-row symmetric int8: `(int8 weight, float scaler)`."""
    scaler = weight.abs().amax(dim=1) / 127
    return torch.round(weight / scaler[:, None]).to(torch.int8), scaler


def test_int8_checkpoint(gemma_model, spm_proto, vocabulary_size, tmp_path):
    hf_state = {k: v.clone() for k, v in gemma_model.state_dict().items()}
    del hf_state["lm_head.weight"]  # Tied to the embedding.
    quantized = {}
    for name, value in hf_state.items():
        if value.ndim == 2:
            quantized[name] = quantize_rows(value)
            hf_state[name] = quantized[name][0].float() * quantized[name][1][:, None]
    # The reference: transformers with the dequantized weights.
    gemma_model = transformers.AutoModelForCausalLM.from_config(
        gemma_model.config, attn_implementation="eager"
    ).eval()
    gemma_model.load_state_dict(hf_state, strict=False)

    int8_state = gemma_pytorch_state({k: q[0] for k, q in quantized.items()} | {
        k: v for k, v in hf_state.items() if k not in quantized
    }, gemma_model.config)
    scalers = gemma_pytorch_state({k: q[1] for k, q in quantized.items()}, gemma_model.config)
    for name, scaler in scalers.items():
        if name != "freqs_cis":
            assert int8_state[name].dtype == torch.int8
            int8_state[name + "_scaler"] = scaler
    path = save_checkpoint(int8_state, tmp_path / "model.ckpt", spm_proto, gemma_model.config)
    assert_same_logits(keras_gemma.GemmaCausalLM.from_preset(path), gemma_model, vocabulary_size)


class _Payload:
    """Creates a file when unpickled: proof that unpickling ran code."""

    marker = None

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_is_refused_unrun(spm_proto, tmp_path):
    payload = _Payload()
    payload.marker = str(tmp_path / "unpickled")
    path = tmp_path / "model.ckpt"
    torch.save({"model_state_dict": {"embedder.weight": torch.zeros(4, 2)}, "x": payload}, path)
    (tmp_path / "tokenizer.model").write_bytes(spm_proto)
    with pytest.raises(ValueError, match=r"model.ckpt holds Python objects other than tensors \(it names [\w.]*open\).*refuses to execute code") as error:
        keras_gemma.GemmaCausalLM.from_preset(str(path))
    assert not (tmp_path / "unpickled").exists()
    assert "weights_only" not in str(error.value)  # torch's advice to run the file's code.


def test_not_a_gemma_pytorch_checkpoint(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"model.embed_tokens.weight": torch.zeros(4, 2)}, path)
    with pytest.raises(ValueError, match="model.ckpt is not a gemma_pytorch .* 'model_state_dict'"):
        keras_gemma.GemmaCausalLM.from_preset(str(path))
    path.write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match="model.ckpt is not a readable PyTorch checkpoint"):
        keras_gemma.GemmaCausalLM.from_preset(str(path))
    torch.save({"model_state_dict": {"embedder.weight": torch.zeros(64, 8)}}, path)
    with open(path, "r+b") as f:  # An interrupted download.
        f.truncate(path.stat().st_size // 2)
    with pytest.raises(ValueError, match="model.ckpt is not a readable PyTorch checkpoint .*truncated or corrupt"):
        keras_gemma.GemmaCausalLM.from_preset(str(path))


def test_fused_qkv_of_the_wrong_size(gemma_model, spm_proto, tmp_path):
    state = gemma_pytorch_state(gemma_model.state_dict(), gemma_model.config)
    name = "model.layers.1.self_attn.qkv_proj.weight"
    state[name] = state[name][:-16]
    path = save_checkpoint(state, tmp_path / "model.ckpt", spm_proto, gemma_model.config)
    with pytest.raises(ValueError, match=f"model.ckpt: {name} has 80 rows; 4 query and 1"):
        keras_gemma.GemmaCausalLM.from_preset(path)


def test_a_state_dict_entry_that_is_not_a_tensor(gemma_model, spm_proto, tmp_path):
    """torch.load(weights_only=True) lets plain numbers through: an
    AttributeError ('int' object has no attribute 'dtype') named no file."""
    state = gemma_pytorch_state(gemma_model.state_dict(), gemma_model.config)
    state["model.norm.weight"] = 3
    path = save_checkpoint(state, tmp_path / "model.ckpt", spm_proto, gemma_model.config)
    with pytest.raises(ValueError, match=r"model.ckpt: model_state_dict entry 'model.norm.weight' is not a tensor \(int\); the file is damaged"):
        keras_gemma.GemmaCausalLM.from_preset(path)
