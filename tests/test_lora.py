import gc
import json
import os
import re
import subprocess
import sys
import warnings
import weakref

import keras
import keras_hub
import numpy as np
import pytest

import keras_gemma
from keras_gemma import lora
from keras_gemma.layers.dense import adapters_merged_on_save
from tests import helpers
from tests.test_presets import INPUTS, logits, randomize_weights

TEXTS = ["The capital of France is Paris.", "hello world, hello gemma"] * 4
ALL = ["query", "key", "value", "attention_output", "ffw_gating", "ffw_gating_2", "ffw_linear"]


def test_lora_fit_reduces_loss_and_adapters_round_trip(spm_proto, vocabulary_size, tmp_path):
    # Seeds the adapters' initial values. Before the tokenizer: on TensorFlow
    # it resets the context, which drops existing SentencePiece resources.
    keras.utils.set_random_seed(0)
    tokenizer = keras_gemma.GemmaTokenizer(proto=spm_proto)
    backbone = keras_gemma.GemmaBackbone(vocabulary_size=vocabulary_size, **helpers.TINY_MQA)
    randomize_weights(backbone)
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor(tokenizer, sequence_length=24)
    gemma_lm = keras_gemma.GemmaCausalLM(backbone, preprocessor)
    gemma_lm.save_to_preset(str(tmp_path / "base"))

    backbone.enable_lora(rank=4)
    # Only the adapters train. EinsumDense LoRA on a [heads, D, H] kernel
    # adds A [heads, D, rank] and B [rank, H], on queries and values.
    N, K, D, H, L, rank = 4, 1, 32, 16, 2, 4
    expected = L * rank * ((N * D + H) + (K * D + H))
    assert sum(int(np.prod(w.shape)) for w in backbone.trainable_weights) == expected

    gemma_lm.compile(optimizer=keras.optimizers.Adam(5e-2))
    history = gemma_lm.fit(TEXTS, batch_size=4, epochs=20, verbose=0)
    losses = history.history["loss"]
    print("LoRA losses per epoch:", [round(x, 3) for x in losses])
    # Frozen random weights make a q/v-only adapter learn slowly: about
    # 4.8 -> 4.0 nats over 20 epochs here.
    assert losses[-1] < losses[0] - 0.5, losses
    assert min(losses[-5:]) < min(losses[:5]) - 0.3, losses

    adapters = str(tmp_path / "adapters.lora.h5")
    backbone.save_lora_weights(adapters)
    restored = keras_gemma.GemmaCausalLM.from_preset(str(tmp_path / "base"))
    assert not np.allclose(logits(restored), logits(gemma_lm), atol=1e-3)
    restored.backbone.load_lora_weights(adapters)
    np.testing.assert_array_equal(logits(restored), logits(gemma_lm))


# === Helpers for the tests below: token-id models without a preprocessor ===

def make_backbone(vocabulary_size, seed=0, **kwargs):
    backbone = keras_gemma.GemmaBackbone(vocabulary_size=vocabulary_size, **helpers.TINY_MQA, **kwargs)
    randomize_weights(backbone, seed)
    return backbone


def backbone_logits(backbone):
    return keras.ops.convert_to_numpy(backbone.token_logits(backbone(INPUTS))).astype("float32")


def randomize_adapters(backbone, seed=1):
    """Non-zero adapters (B starts at zero, which would hide mistakes)."""
    rng = np.random.default_rng(seed)
    for weight in backbone.weights:
        if "lora_kernel" in weight.path:
            weight.assign(rng.normal(0, 0.2, weight.shape).astype("float32"))


def lora_weights(model):
    return [w.path for w in model.weights if "lora" in w.path]


def lora_targets(backbone):
    return sorted({name for _, name, layer in lora.projections(backbone) if layer.lora_enabled})


def param_count(weights):
    return sum(int(np.prod(w.shape)) for w in weights)


def fit_losses(backbone, epochs, learning_rate):
    """Fit next-token prediction on 8 fixed random sequences, one batch per
    epoch; returns the per-epoch losses."""
    rng = np.random.default_rng(0)
    ids = rng.integers(5, backbone.vocabulary_size, (8, 12)).astype("int32")
    x = {"token_ids": ids[:, :-1], "padding_mask": np.ones_like(ids[:, :-1])}
    gemma_lm = keras_gemma.GemmaCausalLM(backbone)
    gemma_lm.compile(optimizer=keras.optimizers.Adam(learning_rate))
    history = gemma_lm.fit(x, ids[:, 1:], batch_size=8, epochs=epochs, verbose=0)
    return history.history["loss"]


# === Targets and trainable parameters ===

def test_trainable_parameters_for_default_all_and_custom_targets(vocabulary_size):
    N, K, D, F, H, L, r = 4, 1, 32, 64, 16, 2, 3
    # A takes the kernel's shape with the last axis replaced by the rank,
    # B is [rank, last axis]: [N, D, H] -> N*D*r + r*H.
    per_target = {
        "query": N * D + H, "key": K * D + H, "value": K * D + H,
        "attention_output": N * H + D,
        "ffw_gating": D + F, "ffw_gating_2": D + F, "ffw_linear": F + D,
    }
    cases = [(None, ["query", "value"]), ("all", ALL), (["ffw_linear", "key"], ["key", "ffw_linear"])]
    for targets, names in cases:
        backbone = make_backbone(vocabulary_size)
        backbone.enable_lora(r, target_layer_names=targets)
        expected = L * r * sum(per_target[name] for name in names)
        assert param_count(backbone.trainable_weights) == expected, targets
        assert len(backbone.trainable_weights) == 2 * L * len(names)
        assert lora.lora_config(backbone) == {"rank": r, "alpha": r, "target_layer_names": names}
    assert backbone.default_lora_layer_names() == ["query", "value"]


def test_freezing_and_unfreezing_after_enable_lora_reaches_every_layer(vocabulary_size):
    """On TensorFlow, `trainable = False` left the adapters trainable and
    `True` left the query/value kernels frozen (Keras' attribute tracking
    skipped setting a frozen block's `trainable` to False again)."""
    backbone = make_backbone(vocabulary_size)
    backbone.enable_lora(4)
    gemma_lm = keras_gemma.GemmaCausalLM(backbone)
    backbone.trainable = False
    assert gemma_lm.trainable_weights == [] and backbone.trainable_weights == []
    backbone.trainable = True
    assert len(gemma_lm.trainable_weights) == len(backbone.weights)
    gemma_lm.trainable = False
    assert gemma_lm.trainable_weights == []


# === Adapter files ===

@pytest.mark.parametrize("filename", ["adapters.safetensors", "adapters.lora.h5"])
def test_adapter_file_restores_rank_alpha_and_custom_targets(filename, vocabulary_size, tmp_path):
    targets = ["key", "attention_output", "ffw_linear"]
    backbone = make_backbone(vocabulary_size)
    backbone.enable_lora(3, target_layer_names=targets, alpha=6)
    randomize_adapters(backbone)
    path = tmp_path / filename
    backbone.save_lora_weights(path)

    metadata = lora.read_adapter_metadata(path)
    assert metadata == {
        "format": "keras_gemma.lora", "version": 1, "rank": 3, "alpha": 6, "scale": 2.0,
        "target_layer_names": targets,
        "model": dict(num_layers=2, hidden_dim=32, num_query_heads=4,
                      num_key_value_heads=1, head_dim=16, intermediate_dim=64),
    }

    # A fresh model gets exactly these targets, rank and alpha.
    fresh = make_backbone(vocabulary_size)
    assert not np.allclose(backbone_logits(fresh), backbone_logits(backbone), atol=1e-3)
    fresh.load_lora_weights(path)
    assert lora_targets(fresh) == sorted(targets)
    assert lora.lora_config(fresh) == {"rank": 3, "alpha": 6, "target_layer_names": targets}
    np.testing.assert_array_equal(backbone_logits(fresh), backbone_logits(backbone))
    assert param_count(fresh.trainable_weights) == param_count(backbone.trainable_weights)

    # Into a model with the same LoRA enabled: the tensors load.
    same = make_backbone(vocabulary_size)
    same.enable_lora(3, target_layer_names=targets, alpha=6)
    same.load_lora_weights(path)
    np.testing.assert_array_equal(backbone_logits(same), backbone_logits(backbone))


def test_interrupted_adapter_save_keeps_the_previous_file(vocabulary_size, tmp_path, monkeypatch):
    backbone = make_backbone(vocabulary_size)
    backbone.enable_lora(2)
    path = tmp_path / "adapters.safetensors"
    backbone.save_lora_weights(path)
    before = path.read_bytes()

    def interrupted(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.numpy.save_file", interrupted)
    randomize_adapters(backbone)
    with pytest.raises(KeyboardInterrupt):
        backbone.save_lora_weights(path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["adapters.safetensors"]


def test_keras_hub_format_adapter_files_still_load(vocabulary_size, tmp_path):
    """Files written by KerasHub's `Backbone.save_lora_weights`, which
    keras_gemma used before it had its own (README: `adapters.lora.h5`)."""
    backbone = make_backbone(vocabulary_size)
    keras_hub.models.Backbone.enable_lora(backbone, 4)
    randomize_adapters(backbone)
    path = str(tmp_path / "old.lora.h5")
    keras_hub.models.Backbone.save_lora_weights(backbone, path)
    fresh = make_backbone(vocabulary_size)
    fresh.load_lora_weights(path)
    assert lora.lora_config(fresh) == {"rank": 4, "alpha": 4, "target_layer_names": ["query", "value"]}
    np.testing.assert_array_equal(backbone_logits(fresh), backbone_logits(backbone))


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_keras_hub_adapter_files_of_sandwich_norm_models_load_into_their_layers(
    family, vocabulary_size, tmp_path
):
    """KerasHub orders a Gemma 2/3 block's layers unlike ours, and its files
    key adapters by that order: key adapters loaded into our values."""
    sizes = dict(helpers.TINY_MQA, use_post_ffw_norm=True, use_post_attention_norm=True)
    if family == "gemma3":
        hub = keras_hub.models.Gemma3Backbone(
            vocabulary_size=vocabulary_size, image_size=16, vision_encoder=None, **sizes
        )
    else:
        hub = keras_hub.models.GemmaBackbone(vocabulary_size=vocabulary_size, **sizes)
    randomize_weights(hub)
    hub.save_to_preset(str(tmp_path / "preset"))
    ours = keras_gemma.GemmaBackbone.from_preset(str(tmp_path / "preset"))

    def hub_logits():
        return keras.ops.convert_to_numpy(hub.token_embedding(hub(INPUTS), reverse=True))

    hub.enable_lora(4, target_layer_names=["key", "ffw_linear"])
    randomize_adapters(hub)
    path = str(tmp_path / "hub.lora.h5")
    hub.save_lora_weights(path)
    ours.load_lora_weights(path)
    assert lora.lora_config(ours)["target_layer_names"] == ["key", "ffw_linear"]
    np.testing.assert_allclose(backbone_logits(ours), hub_logits(), atol=1e-5)


CROSS_BACKEND = """
import json, sys
import numpy as np
import keras, keras_gemma
config, weights, inputs, out, *adapters = sys.argv[1:]
backbone = keras_gemma.GemmaBackbone(**json.loads(config))
backbone.load_weights(weights)
inputs = {k: np.array(v, "int32") for k, v in json.loads(inputs).items()}
results = []
for path in adapters:
    backbone.load_lora_weights(path)
    results.append(keras.ops.convert_to_numpy(backbone.token_logits(backbone(inputs))))
np.save(out, np.stack(results))
"""


def test_adapters_load_on_the_other_backends_with_equal_logits(vocabulary_size, tmp_path):
    config = dict(vocabulary_size=vocabulary_size, **helpers.TINY_MQA)
    backbone = make_backbone(vocabulary_size)
    # Before enable_lora: Keras folds the adapters into the saved kernels.
    backbone.save_weights(str(tmp_path / "base.weights.h5"))
    backbone.enable_lora(4, target_layer_names="all", alpha=8)
    randomize_adapters(backbone)
    expected = backbone_logits(backbone)
    adapters = [str(tmp_path / "adapters.lora.h5"), str(tmp_path / "adapters.safetensors")]
    for path in adapters:
        backbone.save_lora_weights(path)

    inputs = json.dumps({k: v.tolist() for k, v in INPUTS.items()})
    others = [b for b in ("jax", "tensorflow", "torch") if b != keras.backend.backend()]
    runs = {}
    for other in others:  # In parallel: each spends most of its time importing.
        env = {**os.environ, "KERAS_BACKEND": other, "TF_CPP_MIN_LOG_LEVEL": "3"}
        args = [json.dumps(config), str(tmp_path / "base.weights.h5"), inputs,
                str(tmp_path / f"{other}.npy"), *adapters]
        runs[other] = subprocess.Popen(
            [sys.executable, "-c", CROSS_BACKEND, *args],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
    for other, run in runs.items():
        _, stderr = run.communicate(timeout=600)
        assert run.returncode == 0, stderr[-3000:]
        for result in np.load(tmp_path / f"{other}.npy"):
            np.testing.assert_allclose(result, expected, atol=1e-4, rtol=0, err_msg=other)


# === Merging ===

def test_merge_lora_keeps_logits_and_removes_the_adapters(vocabulary_size, tmp_path):
    plain = make_backbone(vocabulary_size)
    backbone = make_backbone(vocabulary_size)
    backbone.token_embedding.trainable = False  # Restored as it was.
    frozen_count = param_count(backbone.trainable_weights)
    backbone.enable_lora(4, target_layer_names="all", alpha=2)
    randomize_adapters(backbone)
    gemma_lm = keras_gemma.GemmaCausalLM(backbone)
    before = logits(gemma_lm)
    assert not np.allclose(before, backbone_logits(plain), atol=1e-3)

    backbone.merge_lora()
    np.testing.assert_allclose(logits(gemma_lm), before, atol=1e-5, rtol=0)
    assert lora_weights(gemma_lm) == []
    assert lora.lora_config(backbone) is None
    assert len(backbone.weights) == len(plain.weights)
    assert param_count(backbone.trainable_weights) == frozen_count
    assert backbone.token_embedding.trainable is False
    if keras.backend.backend() == "torch":  # Gone from torch's parameters too.
        for _, _, layer in lora.projections(backbone):
            assert list(layer.torch_params) == [layer._kernel.path]

    # The merged model saves and loads as a plain one.
    backbone.save_weights(str(tmp_path / "merged.weights.h5"))
    restored = make_backbone(vocabulary_size, seed=5)
    restored.load_weights(str(tmp_path / "merged.weights.h5"))
    np.testing.assert_allclose(backbone_logits(restored), before, atol=1e-5, rtol=0)
    backbone.save_to_preset(str(tmp_path / "merged"))
    from_preset = keras_gemma.GemmaBackbone.from_preset(str(tmp_path / "merged"))
    np.testing.assert_allclose(backbone_logits(from_preset), before, atol=1e-5, rtol=0)

    # LoRA can be enabled again on the merged model.
    backbone.enable_lora(2)
    assert lora.lora_config(backbone)["rank"] == 2


# === QLoRA and mixed precision ===

def quantize_int8(backbone, config=None):
    backbone.quantize("int8", config=config)
    if backbone.token_embedding.quantization_mode is None:
        # Keras' Model.quantize skips ReversibleEmbedding subclasses (its
        # type check), with a warning. The int8 tied embedding is the case
        # that needs enable_lora's care, so quantize it anyway.
        backbone.token_embedding.quantize("int8", type_check=False)
    assert backbone.token_embedding.quantization_mode == "int8"


def test_quantizing_after_enable_lora_frees_the_float_kernels(vocabulary_size):
    backbone = make_backbone(vocabulary_size)
    backbone.enable_lora(4)
    float_kernel = weakref.ref(backbone.transformer_layers[0].attention.query_dense._kernel)
    backbone.quantize("int8")
    gc.collect()
    assert float_kernel() is None


def test_quantize_collects_garbage_once_and_warns_of_nothing(vocabulary_size, monkeypatch):
    # Keras runs gc.collect() for every float kernel it replaces (~0.3 s
    # each with three frameworks imported); the backbone collects once.
    calls = []
    counted = lambda *args: calls.append(args) or 0  # noqa: E731
    monkeypatch.setattr(gc, "collect", counted)
    backbone = make_backbone(vocabulary_size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backbone.quantize("int8")
    quantized = [v for v in backbone.weights if v.path.endswith("/kernel")]
    assert len(quantized) > 1 and all(v.dtype == "int8" for v in quantized)
    assert len(calls) == 1
    # Norms have nothing to quantize: no warning per norm layer.
    assert not [w for w in caught if "quantize" in str(w.message)]
    assert gc.collect is counted  # Restored after quantizing.


@pytest.mark.parametrize("order", ["quantize_first", "enable_first"])
@pytest.mark.parametrize("activations", ["float", "int8"])
def test_qlora_on_int8_trains_saves_loads_and_merges(vocabulary_size, tmp_path, activations, order):
    """Weight-only int8 (`quantize("int8")`), and Keras' default config,
    which rounds the activations to int8 too; quantized before or after
    `enable_lora`."""
    config = keras.quantizers.Int8QuantizationConfig() if activations == "int8" else None
    keras.utils.set_random_seed(0)
    backbone = make_backbone(vocabulary_size)
    if order == "quantize_first":
        quantize_int8(backbone, config)
        backbone.enable_lora(4)
    else:
        backbone.enable_lora(4)
        quantize_int8(backbone, config)
    assert all(v.dtype == "int8" for v in backbone.weights if v.path.endswith("/kernel"))
    losses = fit_losses(backbone, epochs=8, learning_rate=5e-2)
    print("int8 LoRA losses:", [round(x, 3) for x in losses])
    # About 6.04 -> 5.55 (enable_first with int8 activations: 6.04 -> 6.02
    # while the output embedding rounded the hidden states to int8).
    assert np.isfinite(losses).all(), losses
    assert losses[-1] < losses[0] - 0.3, losses
    trained = backbone_logits(backbone)
    # A preset keeps the adapters only merged into the int8 kernels.
    with pytest.warns(UserWarning, match="Saving merges the LoRA adapters of 4 quantized"):
        backbone.save_to_preset(str(tmp_path / "preset"))

    path = str(tmp_path / "qlora.safetensors")
    backbone.save_lora_weights(path)
    fresh = make_backbone(vocabulary_size)
    quantize_int8(fresh, config)
    quantizer = fresh.token_embedding.inputs_quantizer
    assert (quantizer is not None) == (activations == "int8")
    fresh.load_lora_weights(path)
    np.testing.assert_allclose(backbone_logits(fresh), trained, atol=1e-5, rtol=0)

    # Merging requantizes the kernels: equal up to int8 rounding, which
    # can lose small updates (warned).
    with pytest.warns(UserWarning, match="merge_lora.. on int8 kernels requantizes") as warned:
        fresh.merge_lora()
    # Not NumPy's DeprecationWarning per layer from Keras' conversion (torch).
    assert not [w for w in warned if issubclass(w.category, DeprecationWarning)]
    assert lora_weights(fresh) == []
    # enable_lora lets an int8 output embedding see float hidden states (or
    # no gradient would reach the adapters); merging restores it.
    assert fresh.token_embedding.inputs_quantizer is quantizer
    merged = backbone_logits(fresh)
    assert np.abs(merged - trained).max() < 0.1 * np.abs(trained).max()
    # The preset saved with LoRA enabled is that merged model, its output
    # embedding's int8 activations included.
    reloaded = keras_gemma.GemmaBackbone.from_preset(str(tmp_path / "preset"))
    assert (reloaded.token_embedding.inputs_quantizer is not None) == (activations == "int8")
    np.testing.assert_allclose(backbone_logits(reloaded), merged, atol=1e-5, rtol=0)


def token_data(vocabulary_size):
    """8 fixed random sequences: `(x, y)` for next-token prediction."""
    ids = np.random.default_rng(0).integers(5, vocabulary_size, (8, 12)).astype("int32")
    return {"token_ids": ids[:, :-1], "padding_mask": np.ones_like(ids[:, :-1])}, ids[:, 1:]


def assert_same_weights(model, other, atol=0.0):
    """The same variables (a model's or an optimizer's), value by value."""
    weights, others = model.variables, other.variables
    assert [w.path for w in weights] == [w.path for w in others]
    for weight, restored in zip(weights, others):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(restored), keras.ops.convert_to_numpy(weight), atol=atol, rtol=0
        )


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "int8"])
def test_keras_files_and_weight_files_keep_the_lora_training_state(vocabulary_size, tmp_path, quantized):
    """Keras folds the adapters into the kernels when it saves: a `.keras`
    file came back without LoRA (the next `fit()` trained every weight,
    with a new optimizer), and `load_weights` into a model with LoRA
    enabled set both adapters to zero (no gradient: `fit()` changed
    nothing, silently). Both now keep base kernels, adapters and (for
    `.keras`) the optimizer's state, and training resumes where it was."""
    keras.utils.set_random_seed(0)
    x, y = token_data(vocabulary_size)

    def lora_model(seed):
        backbone = make_backbone(vocabulary_size, seed=seed)
        if quantized:
            quantize_int8(backbone)
        backbone.enable_lora(4, alpha=8)
        return keras_gemma.GemmaCausalLM(backbone)

    gemma_lm = lora_model(seed=0)
    gemma_lm.compile(optimizer=keras.optimizers.Adam(1e-2))
    gemma_lm.fit(x, y, batch_size=8, epochs=2, verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # Nothing is merged or requantized.
        gemma_lm.save(tmp_path / "model.keras")
    restored = keras.models.load_model(tmp_path / "model.keras")
    assert lora.lora_config(restored.backbone) == {"rank": 4, "alpha": 8, "target_layer_names": ["query", "value"]}
    assert_same_weights(gemma_lm, restored)
    assert [w.path for w in restored.trainable_weights] == [w.path for w in gemma_lm.trainable_weights]
    assert int(restored.optimizer.iterations) == 2
    assert_same_weights(gemma_lm.optimizer, restored.optimizer)
    for model in (gemma_lm, restored):  # One more step each: the same.
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert_same_weights(gemma_lm, restored, atol=1e-6)

    # save_weights / load_weights into another model with LoRA enabled.
    gemma_lm.save_weights(tmp_path / "model.weights.h5")
    other = lora_model(seed=5)
    other.load_weights(tmp_path / "model.weights.h5")
    assert_same_weights(gemma_lm.backbone, other.backbone)
    # Into a model without LoRA: which rank to enable.
    plain = keras_gemma.GemmaCausalLM(make_backbone(vocabulary_size))
    if quantized:
        quantize_int8(plain.backbone)
    with pytest.raises(ValueError, match=r"include LoRA adapters \(rank 4\).*enable_lora\(rank=4"):
        plain.load_weights(tmp_path / "model.weights.h5")


def test_kernels_saved_with_the_adapters_folded_in_load_into_a_lora_model_that_learns(vocabulary_size, tmp_path):
    """Weights saved as Keras saves them and presets store them (adapters
    folded into the kernels), loaded into a model with LoRA enabled: its
    outputs are the file's, and its adapters can learn (Keras loaded both
    as zeros: no gradient)."""
    keras.utils.set_random_seed(0)
    backbone = make_backbone(vocabulary_size)
    backbone.enable_lora(4)
    randomize_adapters(backbone)
    trained = backbone_logits(backbone)
    with adapters_merged_on_save():
        backbone.save_weights(str(tmp_path / "merged.weights.h5"))
    backbone.save_to_preset(str(tmp_path / "preset"))
    with open(tmp_path / "preset" / "config.json") as file:
        assert "lora" not in json.load(file)["config"]  # KerasHub loads it.
    from_preset = keras_gemma.GemmaBackbone.from_preset(str(tmp_path / "preset"))
    assert lora.lora_config(from_preset) is None
    np.testing.assert_allclose(backbone_logits(from_preset), trained, atol=1e-5, rtol=0)

    fresh = make_backbone(vocabulary_size, seed=5)
    fresh.enable_lora(4)
    fresh.load_weights(str(tmp_path / "merged.weights.h5"))
    np.testing.assert_allclose(backbone_logits(fresh), trained, atol=1e-5, rtol=0)
    adapters = {w.path: keras.ops.convert_to_numpy(w) for w in fresh.weights if "lora_kernel" in w.path}
    losses = fit_losses(fresh, epochs=3, learning_rate=5e-2)
    assert losses[-1] < losses[0], losses
    assert all(
        not np.array_equal(keras.ops.convert_to_numpy(w), adapters[w.path])
        for w in fresh.weights if "lora_kernel" in w.path
    )


@pytest.mark.parametrize("mode", ["int8", "int8_activations", "int4"])
@pytest.mark.parametrize("dtype", ["bfloat16", "mixed_bfloat16"])
def test_qlora_on_a_sixteen_bit_quantized_model_trains(vocabulary_size, dtype, mode):
    """`from_preset(..., dtype="bfloat16")`, `quantize(...)`, `enable_lora`:
    float32 adapters on bfloat16 activations (PyTorch's einsum does not
    promote them by itself; Keras' int4 and activation-int8 calls failed)."""
    keras.utils.set_random_seed(0)
    backbone = make_backbone(vocabulary_size, dtype=dtype)
    if mode == "int8_activations":
        backbone.quantize("int8", config=keras.quantizers.Int8QuantizationConfig())
    else:
        backbone.quantize(mode)
    backbone.enable_lora(4)
    losses = fit_losses(backbone, epochs=8, learning_rate=5e-2)
    print(f"{dtype} {mode} LoRA losses:", [round(x, 3) for x in losses])
    assert np.isfinite(losses).all(), losses
    assert losses[-1] < losses[0] - 0.3, losses


def test_mixed_bfloat16_trains_with_lora(vocabulary_size):
    keras.utils.set_random_seed(0)
    backbone = make_backbone(vocabulary_size, dtype="mixed_bfloat16")
    backbone.enable_lora(4, target_layer_names="all")
    query = backbone.transformer_layers[0].attention.query_dense
    assert (query.compute_dtype, query._kernel.dtype, query.lora_kernel_a.dtype) == (
        "bfloat16", "float32", "float32")
    losses = fit_losses(backbone, epochs=8, learning_rate=5e-2)
    print("mixed_bfloat16 LoRA losses:", [round(x, 3) for x in losses])
    assert np.isfinite(losses).all(), losses
    assert losses[-1] < losses[0] - 0.5, losses

    # Merging adds the update in float32 and rounds once (the LoRA path
    # rounds the kernel to bfloat16 before adding it): as close to the
    # float32 result as the LoRA path.
    reference = make_backbone(vocabulary_size)
    reference.enable_lora(4, target_layer_names="all")
    for ours, theirs in zip(reference.trainable_weights, backbone.trainable_weights):
        ours.assign(theirs)
    exact = backbone_logits(reference)
    before = backbone_logits(backbone)
    backbone.merge_lora()
    after = backbone_logits(backbone)
    print("mean |error| vs float32, LoRA / merged:", np.abs(before - exact).mean(), np.abs(after - exact).mean())
    assert np.abs(after - exact).mean() < 1.2 * np.abs(before - exact).mean()


# === Errors (random weights not needed) ===

@pytest.mark.parametrize("rank", [0, -2, 2.5, True, "4"])
def test_rank_must_be_a_positive_integer(rank, vocabulary_size):
    backbone = keras_gemma.GemmaBackbone(vocabulary_size=vocabulary_size, **helpers.TINY_MQA)
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        backbone.enable_lora(rank)
    assert lora_weights(backbone) == []


def test_bad_arguments_and_mismatched_files_are_clear_errors(vocabulary_size, tmp_path):
    backbone = keras_gemma.GemmaBackbone(vocabulary_size=vocabulary_size, **helpers.TINY_MQA)
    with pytest.raises(ValueError, match=r"\['querry'\] match no layer.*'attention_output'.*'ffw_gating_2'"):
        backbone.enable_lora(4, target_layer_names=["query", "querry"])
    with pytest.raises(ValueError, match="alpha must be a positive number"):
        backbone.enable_lora(4, alpha=0)
    with pytest.raises(ValueError, match="LoRA is not enabled"):
        backbone.save_lora_weights(tmp_path / "a.lora.h5")
    with pytest.raises(ValueError, match="nothing to merge"):
        backbone.merge_lora()
    assert lora_weights(backbone) == []

    backbone.enable_lora(4)
    with pytest.raises(ValueError, match="already enabled"):
        backbone.enable_lora(4)
    with pytest.raises(ValueError, match=r"must end in `\.safetensors` or `\.h5`"):
        backbone.save_lora_weights(tmp_path / "adapters.pkl")
    path = tmp_path / "adapters.safetensors"
    backbone.save_lora_weights(path)

    # Another shape.
    other = keras_gemma.GemmaBackbone(vocabulary_size=vocabulary_size, **helpers.TINY_MHA)
    with pytest.raises(ValueError, match=r"another shape: hidden_dim=32 \(this model: 48\), num_key_value_heads=1 \(this model: 4\), intermediate_dim=64 \(this model: 96\)"):
        other.load_lora_weights(path)
    assert lora_weights(other) == []
    deeper = keras_gemma.GemmaBackbone(vocabulary_size=vocabulary_size, **{**helpers.TINY_MQA, "num_layers": 3})
    with pytest.raises(ValueError, match=r"num_layers=2 \(this model: 3\)"):
        deeper.load_lora_weights(path)

    # LoRA already enabled with another rank, alpha or targets.
    for kwargs, message in [
        (dict(rank=8), "rank: file 4, model 8"),
        (dict(rank=4, alpha=8), "alpha: file 4, model 8"),
        (dict(rank=4, target_layer_names="all"), r"target_layer_names: file \['query', 'value'\], model \['query', 'key'"),
    ]:
        model = keras_gemma.GemmaBackbone(vocabulary_size=vocabulary_size, **helpers.TINY_MQA)
        model.enable_lora(**kwargs)
        with pytest.raises(ValueError, match=message):
            model.load_lora_weights(path)

    # Not an adapter file.
    other.save_weights(str(tmp_path / "model.weights.h5"))
    with pytest.raises(ValueError, match="not a keras_gemma LoRA adapter file"):
        other.load_lora_weights(tmp_path / "model.weights.h5")


def test_damaged_or_misplaced_adapter_files_are_clear_errors(vocabulary_size, tmp_path):
    """A truncated file gave safetensors' or h5py's own error, naming no
    file; metadata without a rank a KeyError; a directory in the file's
    place an IsADirectoryError naming a temporary file, after writing."""
    backbone = keras_gemma.GemmaBackbone(vocabulary_size=vocabulary_size, **helpers.TINY_MQA)
    backbone.enable_lora(4)
    model = keras_gemma.GemmaBackbone(vocabulary_size=vocabulary_size, **helpers.TINY_MQA)
    for name in ("adapters.safetensors", "adapters.lora.h5"):
        path = tmp_path / name
        backbone.save_lora_weights(path)
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)
        with pytest.raises(ValueError, match=f"{re.escape(str(path))} is not a readable LoRA adapter file .*truncated or corrupt"):
            model.load_lora_weights(path)
    from safetensors.numpy import save_file

    save_file({}, str(tmp_path / "no_rank.safetensors"), metadata={lora.METADATA_KEY: json.dumps({"format": lora.FORMAT})})
    with pytest.raises(ValueError, match="not a keras_gemma LoRA adapter file"):
        model.load_lora_weights(tmp_path / "no_rank.safetensors")
    with pytest.raises(FileNotFoundError, match="No LoRA adapter file at"):
        model.load_lora_weights(tmp_path / "missing.safetensors")
    (tmp_path / "folder.safetensors").mkdir()
    with pytest.raises(IsADirectoryError, match="folder.safetensors is a directory"):
        backbone.save_lora_weights(tmp_path / "folder.safetensors")
    with pytest.raises(ValueError, match=r"must end in `\.safetensors` or `\.h5`.*got None"):
        backbone.save_lora_weights(None)
    assert lora_weights(model) == []


def test_nan_adapters_are_neither_saved_nor_loaded(vocabulary_size, tmp_path):
    """Adapters of a diverged training made every logit NaN: greedy text
    came back empty, with no error."""
    backbone = keras_gemma.GemmaBackbone(vocabulary_size=vocabulary_size, **helpers.TINY_MQA)
    backbone.enable_lora(4)
    path = tmp_path / "adapters.safetensors"
    backbone.save_lora_weights(path)
    saved = path.read_bytes()
    kernel = backbone.transformer_layers[0].attention.query_dense.lora_kernel_b
    kernel.assign(np.full(kernel.shape, np.nan, "float32"))
    with pytest.raises(ValueError, match=r"adapters hold \d+ NaN or infinite values .*nothing was saved.*learning rate"):
        backbone.save_lora_weights(path)
    assert path.read_bytes() == saved

    from safetensors.numpy import load_file
    from safetensors.numpy import save_file

    tensors = load_file(str(path))
    key = next(iter(tensors))
    tensors[key][0] = np.inf
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={lora.METADATA_KEY: json.dumps(lora.read_adapter_metadata(path))})
    model = keras_gemma.GemmaBackbone(vocabulary_size=vocabulary_size, **helpers.TINY_MQA)
    with pytest.raises(ValueError, match=f"adapters in {re.escape(str(bad))} hold \\d+ NaN or infinite .*{re.escape(key)}.*model is unchanged"):
        model.load_lora_weights(bad)
    assert lora_weights(model) == []


def test_generate_follows_adapter_changes_after_compiling(vocabulary_size, tmp_path):
    """generate() on an already-used model must see adapters enabled, loaded
    or merged afterwards (TensorFlow's traced function kept the old
    variables)."""
    backbone = make_backbone(vocabulary_size)
    gemma_lm = keras_gemma.GemmaCausalLM(backbone)
    prompt = {"token_ids": np.array([[2, 7, 9, 0, 0, 0, 0, 0]], "int32"),
              "padding_mask": np.array([[1, 1, 1, 0, 0, 0, 0, 0]], "int32")}

    def greedy():
        out = gemma_lm.generate(prompt, stop_token_ids=None)
        return keras.ops.convert_to_numpy(out["token_ids"])

    def greedy_by_forward_passes():
        ids = prompt["token_ids"].copy()
        for index in range(3, ids.shape[1]):
            x = {"token_ids": ids[:, :index], "padding_mask": np.ones_like(ids[:, :index])}
            ids[0, index] = logits(gemma_lm, x)[0, -1].argmax()
        return ids

    base = greedy()
    np.testing.assert_array_equal(base, greedy_by_forward_passes())
    backbone.enable_lora(4, target_layer_names="all")
    randomize_adapters(backbone, seed=3)
    adapted = greedy()
    np.testing.assert_array_equal(adapted, greedy_by_forward_passes())
    assert not np.array_equal(adapted, base)
    backbone.merge_lora()
    np.testing.assert_array_equal(greedy(), adapted)  # Not applied twice.
    # New adapters of the same shapes (their ids may reuse the old ones').
    backbone.enable_lora(4, target_layer_names="all")
    randomize_adapters(backbone, seed=4)
    np.testing.assert_array_equal(greedy(), greedy_by_forward_passes())
