"""fit() is compiled on every backend (`jit_compile="auto"` means compiled
here, PyTorch included) and computes what eager training computes."""

import keras
import numpy as np
import pytest

import keras_gemma
from tests import helpers
from tests.test_presets import randomize_weights


pytestmark = pytest.mark.usefixtures("compiled_paths")


def lora_losses(dtype="float32", loss=None, **compile_kwargs):
    keras.utils.set_random_seed(0)  # The adapters' initial values.
    backbone = keras_gemma.GemmaBackbone(vocabulary_size=64, dtype=dtype, **helpers.TINY_MQA)
    randomize_weights(backbone)
    gemma_lm = keras_gemma.GemmaCausalLM(backbone, preprocessor=None)
    backbone.enable_lora(rank=2)
    gemma_lm.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        **compile_kwargs,
    )
    tokens = np.random.default_rng(0).integers(3, 64, (4, 13)).astype("int32")
    x = {"token_ids": tokens[:, :-1], "padding_mask": np.ones_like(tokens[:, :-1])}
    history = gemma_lm.fit(x, tokens[:, 1:], batch_size=4, epochs=4, shuffle=False, verbose=0)
    return gemma_lm, history.history["loss"]


# Mixed precision: bfloat16 products, whose rounding differs between
# compiled and eager kernels (tolerance 2%).
@pytest.mark.parametrize("dtype, rtol", [("float32", 1e-4), ("mixed_bfloat16", 2e-2)])
def test_fit_is_compiled_by_default_and_matches_eager(dtype, rtol):
    compiled_lm, compiled = lora_losses(dtype)
    # TensorFlow without a GPU fits 16-bit models as a graph (test below).
    as_graph = keras.config.backend() == "tensorflow" and dtype != "float32"
    assert compiled_lm.jit_compile is not as_graph
    _, eager = lora_losses(dtype, run_eagerly=True)
    assert compiled[-1] < compiled[0]
    np.testing.assert_allclose(compiled, eager, rtol=rtol)


def test_eager_fit_then_compiled_fit_leaves_keras_usable():
    """On PyTorch, gradients left by an eager step made the first compiled
    step leave a gradient tensor as Keras' call context: every later layer
    call in the process (generate, a new model, any keras.layers.Dense)
    failed with "'Tensor' object has no attribute 'get_value'"."""
    from keras.src.backend.common import global_state

    gemma_lm, eager = lora_losses(jit_compile=False)
    gemma_lm.compile(optimizer=keras.optimizers.Adam(1e-2), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    tokens = np.random.default_rng(0).integers(3, 64, (4, 13)).astype("int32")
    x = {"token_ids": tokens[:, :-1], "padding_mask": np.ones_like(tokens[:, :-1])}
    compiled = gemma_lm.fit(x, tokens[:, 1:], batch_size=4, epochs=2, shuffle=False, verbose=0).history["loss"]
    assert compiled[-1] < eager[0]
    assert global_state.get_global_attribute("current_call_ctx") is None
    assert keras.layers.Dense(2)(np.ones((1, 3), "float32")).shape == (1, 2)
    assert gemma_lm.generate(x, max_length=14, stop_token_ids=None)["token_ids"].shape == (4, 14)


def test_torch_compilation_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("KERAS_GEMMA_TORCH_COMPILE", "0")
    gemma_lm = keras_gemma.GemmaCausalLM(
        keras_gemma.GemmaBackbone(vocabulary_size=64, **helpers.TINY_MQA), preprocessor=None
    )
    gemma_lm.compile()
    assert gemma_lm.jit_compile is (keras.config.backend() != "torch")
    gemma_lm.compile(jit_compile=False)
    assert gemma_lm.jit_compile is False


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "mixed_bfloat16"])
def test_sixteen_bit_tensorflow_fits_as_a_graph_and_generates_with_xla(dtype):
    """On TensorFlow without a GPU a 16-bit model trains as a TensorFlow
    graph (oneDNN's bfloat16 kernels; XLA's are slower there) and still
    generates with XLA; float32 and the other backends compile both."""
    gemma_lm = keras_gemma.GemmaCausalLM(
        keras_gemma.GemmaBackbone(vocabulary_size=64, dtype=dtype, **helpers.TINY_MQA),
        preprocessor=None,
    )
    gemma_lm.compile()
    tensorflow_cpu = False
    if keras.config.backend() == "tensorflow":
        import tensorflow as tf

        tensorflow_cpu = not tf.config.list_logical_devices("GPU")
    assert gemma_lm.jit_compile is not (tensorflow_cpu and dtype != "float32")
    generate = gemma_lm.make_generate_function()
    if keras.config.backend() == "tensorflow":
        assert generate.compiled._jit_compile is True
    gemma_lm.compile(jit_compile=False)
    if keras.config.backend() == "tensorflow":
        assert gemma_lm.make_generate_function().compiled._jit_compile is False


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_training_steps_after_the_first_compile_nothing(monkeypatch, optimizer):
    """PyTorch: the step is one graph, and Keras' step clears the gradients before computing new ones,
    so Dynamo compiled the step a second time at the second call (unset
    gradients at the first, set at the second), 10+ s on a CPU. JAX and
    TensorFlow run the step's Python only while tracing it."""
    traces = []
    train_step = keras_gemma.GemmaCausalLM.train_step

    def traced_train_step(self, *args):
        traces.append(1)
        return train_step(self, *args)

    on_torch = keras.config.backend() == "torch"
    if on_torch:
        import torch._dynamo

        torch._dynamo.reset()  # Dynamo's counters are process-wide.
        torch._dynamo.utils.counters.clear()
    else:
        monkeypatch.setattr(keras_gemma.GemmaCausalLM, "train_step", traced_train_step)

    def compiled():
        if on_torch:
            return torch._dynamo.utils.counters["stats"]["unique_graphs"]
        return len(traces)

    backbone = keras_gemma.GemmaBackbone(vocabulary_size=64, **helpers.TINY_MQA)
    gemma_lm = keras_gemma.GemmaCausalLM(backbone, preprocessor=None)
    backbone.enable_lora(rank=2)
    # AdamW fills a weight decay cache at its first update (PyTorch recompiled).
    gemma_lm.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(True))
    tokens = np.random.default_rng(0).integers(3, 64, (2, 9)).astype("int32")
    x = {"token_ids": tokens[:, :-1], "padding_mask": np.ones_like(tokens[:, :-1])}
    counts = []
    for _ in range(3):
        gemma_lm.train_on_batch(x, tokens[:, 1:])
        counts.append(compiled())
    assert gemma_lm.jit_compile and counts[0] > 0
    assert counts[1] == counts[2] == counts[0], counts
    if on_torch:
        # One graph (forward, backward and update), traced once: Keras'
        # compiled wrapper broke at `loss.backward()` into two graphs and
        # traced the forward pass three times.
        assert counts[0] == 1, counts
        assert not torch._dynamo.utils.counters["graph_break"]
        # The gradients are not kept between steps.
        assert all(weight.value.grad is None for weight in gemma_lm.trainable_weights)


def test_gradient_accumulation_compiles_each_branch_once_and_matches_eager():
    """`Adam(gradient_accumulation_steps=2)` updates every second step
    (`keras.ops.cond`). PyTorch compiled the step again at every step:
    each `cond` took a new unique name, and Dynamo guarded on Keras' name
    counter. Each branch now compiles once; losses equal eager training's."""
    on_torch = keras.config.backend() == "torch"
    if on_torch:
        import torch._dynamo

        torch._dynamo.reset()  # Dynamo's counters are process-wide.
        torch._dynamo.utils.counters.clear()

    def losses(**compile_kwargs):
        keras.utils.set_random_seed(0)
        backbone = keras_gemma.GemmaBackbone(vocabulary_size=64, **helpers.TINY_MQA)
        gemma_lm = keras_gemma.GemmaCausalLM(backbone, preprocessor=None)
        backbone.enable_lora(rank=2)
        gemma_lm.compile(
            optimizer=keras.optimizers.Adam(1e-2, gradient_accumulation_steps=2),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            **compile_kwargs,
        )
        tokens = np.random.default_rng(0).integers(3, 64, (2, 9)).astype("int32")
        x = {"token_ids": tokens[:, :-1], "padding_mask": np.ones_like(tokens[:, :-1])}
        result, graphs = [], []
        for _ in range(6):
            result.append(float(gemma_lm.train_on_batch(x, tokens[:, 1:], return_dict=True)["loss"]))
            if on_torch:
                graphs.append(torch._dynamo.utils.counters["frames"]["ok"])  # Frames compiled.
        return gemma_lm, result, graphs

    compiled_lm, compiled, graphs = losses()
    assert compiled_lm.jit_compile
    _, eager, _ = losses(run_eagerly=True)
    np.testing.assert_allclose(compiled, eager, rtol=1e-5)
    # The weights change every second step only: equal losses in pairs.
    assert compiled[0] == compiled[1] and compiled[2] == compiled[3]
    assert compiled[2] < compiled[0] and compiled[4] < compiled[2]
    if on_torch:  # Both branches compiled by the second step; nothing after.
        assert graphs[1] == graphs[-1], graphs


def test_a_failed_fit_evaluate_or_predict_leaves_the_model_usable(monkeypatch):
    # Keras' JAX trainer detached the variables for the call and left them
    # so when its first step failed: every later call raised "'NoneType'
    # object is not callable" until the model was reloaded. PyTorch runs
    # it eager: each failing call compiled a graph first (196 s in all).
    monkeypatch.setenv("KERAS_GEMMA_TORCH_COMPILE", "0")
    gemma_lm, _ = lora_losses()
    tokens = np.random.default_rng(1).integers(3, 64, (4, 13)).astype("int32")
    x = {"token_ids": tokens[:, :-1], "padding_mask": np.ones_like(tokens[:, :-1])}
    y = tokens[:, 1:]
    weights = [keras.ops.convert_to_numpy(w) for w in gemma_lm.weights]
    loss = gemma_lm.evaluate(x, y, batch_size=4, verbose=0)
    failing_calls = {
        "fit": lambda: gemma_lm.fit(x, y[:, :5], batch_size=4, verbose=0),
        "evaluate": lambda: gemma_lm.evaluate(x, y[:, :5], batch_size=4, verbose=0),
        "predict": lambda: gemma_lm.predict({"token_ids": x["token_ids"]}, batch_size=4, verbose=0),
    }
    for name, call in failing_calls.items():
        with pytest.raises(Exception):
            call()
        assert gemma_lm.evaluate(x, y, batch_size=4, verbose=0) == loss, name
    for before, after in zip(weights, gemma_lm.weights):
        np.testing.assert_array_equal(before, keras.ops.convert_to_numpy(after))
    history = gemma_lm.fit(x, y, batch_size=4, epochs=2, verbose=0).history["loss"]
    assert history[1] < history[0]


def test_functions_traced_before_the_weights_changed_are_not_reused(tmp_path, monkeypatch):
    """evaluate()/predict() traced before load_lora_weights or merge_lora
    ignored the new adapters or applied merged ones twice (TensorFlow), and
    fit() after enable_lora without compile() trained the frozen weights
    (TensorFlow) or failed obscurely (JAX, PyTorch)."""
    # TensorFlow's traced graphs, without XLA: tracing is what went stale
    # (with XLA this took 100 s here, 18 s without).
    monkeypatch.setenv("KERAS_GEMMA_TF_XLA", "0")
    gemma_lm, _ = lora_losses()
    gemma_lm.backbone.save_lora_weights(str(tmp_path / "adapters.safetensors"))
    tokens = np.random.default_rng(1).integers(3, 64, (4, 13)).astype("int32")
    x = {"token_ids": tokens[:, :-1], "padding_mask": np.ones_like(tokens[:, :-1])}
    y = tokens[:, 1:]

    def direct_logits(model):
        return keras.ops.convert_to_numpy(model(x))

    backbone = keras_gemma.GemmaBackbone(vocabulary_size=64, **helpers.TINY_MQA)
    randomize_weights(backbone)
    fresh = keras_gemma.GemmaCausalLM(backbone, preprocessor=None)
    fresh.compile()
    base_loss = fresh.evaluate(x, y, verbose=0)
    fresh.predict(x, verbose=0)
    backbone.load_lora_weights(str(tmp_path / "adapters.safetensors"))
    loss = fresh.evaluate(x, y, verbose=0)[0]
    assert loss == pytest.approx(gemma_lm.evaluate(x, y, verbose=0)[0], rel=1e-6)
    assert abs(loss - base_loss[0]) > 1e-4  # (The adapters changed it by ~2e-3.)
    np.testing.assert_allclose(fresh.predict(x, verbose=0), direct_logits(gemma_lm), atol=1e-4)
    backbone.merge_lora()
    np.testing.assert_allclose(fresh.predict(x, verbose=0), direct_logits(gemma_lm), atol=1e-4)

    backbone.enable_lora(2)
    with pytest.raises(ValueError, match=r"weights changed after compile\(\).*Call compile\(\) again"):
        fresh.fit(x, y, verbose=0)
    fresh.compile(optimizer=keras.optimizers.Adam(1e-2))
    adapters = [keras.ops.convert_to_numpy(w) for w in backbone.trainable_weights]
    fresh.fit(x, y, epochs=2, verbose=0)
    assert all(
        not np.array_equal(before, keras.ops.convert_to_numpy(after))
        for before, after in zip(adapters[1::2], backbone.trainable_weights[1::2])
    )


def test_the_model_called_in_training_mode_returns_logits():
    """LoRA on JAX/TensorFlow computes the loss from hidden states inside
    the train step; `model(x, training=True)` and `compute_loss` outside it
    returned / expected the hidden states."""
    gemma_lm, _ = lora_losses()
    tokens = np.random.default_rng(1).integers(3, 64, (2, 9)).astype("int32")
    x = {"token_ids": tokens[:, :-1], "padding_mask": np.ones_like(tokens[:, :-1])}
    y = tokens[:, 1:]
    logits = gemma_lm(x, training=True)
    assert tuple(logits.shape) == (2, 8, 64)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(logits), keras.ops.convert_to_numpy(gemma_lm(x)), atol=1e-5)
    expected = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, logits)
    loss = gemma_lm.compute_loss(x, y, logits)
    assert float(keras.ops.convert_to_numpy(loss)) == pytest.approx(float(keras.ops.convert_to_numpy(expected)), rel=1e-5)
