"""generate()'s compiled paths: the same tokens as eager decoding, compiled
once per shape, int8/bfloat16 variants (the benchmark harness: test_bench.py)."""

import os
import subprocess
import sys
import tempfile

import keras
import numpy as np
import pytest

import keras_gemma
from keras_gemma import bench
from tests import helpers
from tests.test_presets import randomize_weights

VOCABULARY = 96
SLIDING = dict(
    helpers.TINY_MQA, num_layers=3, sliding_window=4,
    layer_types=["sliding", "global", "sliding"], use_query_key_norm=True,
    use_sandwich_norms=True, final_logit_soft_cap=30.0,
)


pytestmark = pytest.mark.usefixtures("compiled_paths")


def tiny_lm(config=helpers.TINY_MQA, seed=0, **kwargs):
    backbone = keras_gemma.GemmaBackbone(vocabulary_size=VOCABULARY, **config, **kwargs)
    randomize_weights(backbone, seed)
    return keras_gemma.GemmaCausalLM(backbone, preprocessor=None)


def prompts(lengths=(7, 3), max_length=20):
    """Right-padded prompts of different lengths (ids >= 3: no special ids)."""
    token_ids = np.zeros((len(lengths), max_length), "int32")
    padding_mask = np.zeros_like(token_ids)
    rng = np.random.default_rng(0)
    for row, length in enumerate(lengths):
        token_ids[row, :length] = rng.integers(3, VOCABULARY, length)
        padding_mask[row, :length] = 1
    return {"token_ids": token_ids, "padding_mask": padding_mask}


def generated(gemma_lm, inputs, **kwargs):
    return np.asarray(gemma_lm.generate(inputs, **kwargs)["token_ids"])


def test_freezing_other_layers_between_calls_keeps_each_layers_weights():
    """JAX's compiled function paired values with variables by place among
    the trainable and non-trainable ones: freezing block 1 instead of block 0
    (same shapes) ran each with the other's weights."""
    gemma_lm = tiny_lm()
    inputs = prompts()
    eager = tiny_lm()  # The same weights (seeded), decoded eagerly.
    eager.compile(sampler="greedy", run_eagerly=True)
    for frozen in (0, 1):
        for i, block in enumerate(gemma_lm.backbone.transformer_layers):
            block.trainable = i != frozen
        np.testing.assert_array_equal(
            generated(gemma_lm, inputs, stop_token_ids=None), generated(eager, inputs, stop_token_ids=None)
        )


def test_token_ids_may_be_python_lists():
    gemma_lm = tiny_lm()
    inputs = prompts()
    as_lists = {key: value.tolist() for key, value in inputs.items()}
    np.testing.assert_array_equal(
        generated(gemma_lm, as_lists, stop_token_ids=None), generated(gemma_lm, inputs, stop_token_ids=None)
    )


def test_max_length_pads_token_ids():
    """Without a preprocessor, max_length was checked, then ignored: the
    token ids' width set the length."""
    gemma_lm = tiny_lm()
    inputs = prompts(max_length=10)
    longer = generated(gemma_lm, inputs, max_length=14, stop_token_ids=None)
    padded = prompts(max_length=14)
    assert longer.shape == (2, 14)
    np.testing.assert_array_equal(longer, generated(gemma_lm, padded, stop_token_ids=None))
    assert generated(gemma_lm, inputs, max_length=10, stop_token_ids=None).shape == (2, 10)
    with pytest.raises(ValueError, match="max_length=8 is shorter than the token_ids' 10 columns"):
        gemma_lm.generate(inputs, max_length=8)
    # The same prompts as a dataset (their max_length was ignored).
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices(inputs).batch(2)
    from_dataset = gemma_lm.generate(dataset, max_length=14, stop_token_ids=None)
    np.testing.assert_array_equal(np.asarray(from_dataset["token_ids"]), longer)
    with pytest.raises(ValueError, match="max_length=8 is shorter than the token_ids' 10 columns"):
        gemma_lm.generate(dataset, max_length=8)


def test_left_padded_or_empty_prompts_are_a_clear_error():
    """generate() continues after each row's prompt at its start; a
    left-padded row generated other tokens, silently."""
    gemma_lm = tiny_lm()
    inputs = prompts(lengths=(4, 4))
    inputs["padding_mask"][1] = np.roll(inputs["padding_mask"][1], 3)
    with pytest.raises(ValueError, match=r"right-padded prompts.*row 1 is \[0, 0, 0, 1, 1, 1, 1, 0"):
        gemma_lm.generate(inputs, stop_token_ids=None)
    inputs["padding_mask"][1] = 0
    with pytest.raises(ValueError, match="at least one.*row 1 is"):
        gemma_lm.generate(inputs, stop_token_ids=None)


@pytest.mark.parametrize("config", [helpers.TINY_MQA, SLIDING], ids=["global", "sliding"])
def test_compiled_generation_equals_eager(config):
    gemma_lm = tiny_lm(config)
    inputs = prompts()
    # No stop tokens, then one that the eager run produces mid-way: both
    # paths must stop (and mask) at the same place.
    fast = generated(gemma_lm, inputs, stop_token_ids=None)
    gemma_lm.compile(sampler="greedy", run_eagerly=True)
    eager = generated(gemma_lm, inputs, stop_token_ids=None)
    np.testing.assert_array_equal(fast, eager)
    # The prompts are kept and something was generated.
    np.testing.assert_array_equal(fast[inputs["padding_mask"] == 1], inputs["token_ids"][inputs["padding_mask"] == 1])
    stop = int(eager[1, 8])
    eager_stopped = gemma_lm.generate(inputs, stop_token_ids=[stop])
    gemma_lm.compile(sampler="greedy")
    fast_stopped = gemma_lm.generate(inputs, stop_token_ids=[stop])
    for key in ("token_ids", "padding_mask"):
        np.testing.assert_array_equal(np.asarray(fast_stopped[key]), np.asarray(eager_stopped[key]))
    assert not np.asarray(fast_stopped["padding_mask"])[1, 9:].any()


def test_jit_compile_false_generates_uncompiled_on_every_backend():
    """`compile(jit_compile=False)` turns generation's compilation off (JAX
    included, where KerasHub's function would still jit), with the same
    tokens."""
    gemma_lm = tiny_lm()
    inputs = prompts()
    fast = generated(gemma_lm, inputs, stop_token_ids=None)
    gemma_lm.compile(sampler="greedy", jit_compile=False)
    compiled = gemma_lm.make_generate_function().compiled
    backend = keras.config.backend()
    if backend == "jax":
        assert compiled == gemma_lm.generate_step
    elif backend == "tensorflow":
        assert compiled._jit_compile is False
    else:
        assert gemma_lm._torch_decode_step is None
    np.testing.assert_array_equal(generated(gemma_lm, inputs, stop_token_ids=None), fast)


def test_tensorflow_xla_off_runs_fit_and_generate_as_graphs(monkeypatch):
    """`KERAS_GEMMA_TF_XLA=0` (the test suite's setting): on TensorFlow,
    "auto" compiles `generate()` and `fit()` as graphs without XLA, with
    XLA's tokens; an explicit `jit_compile=True` still means XLA. Other
    backends ignore it; a value that is not 0 or 1 is refused."""
    gemma_lm = tiny_lm()
    inputs = prompts()
    expected = generated(gemma_lm, inputs, stop_token_ids=None)
    monkeypatch.setenv("KERAS_GEMMA_TF_XLA", "0")
    gemma_lm.compile(sampler="greedy")
    tensorflow = keras.config.backend() == "tensorflow"
    assert gemma_lm.jit_compile is not tensorflow
    if tensorflow:
        assert gemma_lm.make_generate_function().compiled._jit_compile is False
    np.testing.assert_array_equal(generated(gemma_lm, inputs, stop_token_ids=None), expected)
    if tensorflow:
        gemma_lm.compile(sampler="greedy", jit_compile=True)
        assert gemma_lm.make_generate_function().compiled._jit_compile is True
    monkeypatch.setenv("KERAS_GEMMA_TF_XLA", "off")
    if tensorflow:
        with pytest.raises(ValueError, match="KERAS_GEMMA_TF_XLA='off' is not a choice"):
            gemma_lm.compile()
    else:
        gemma_lm.compile()


def test_sampling_on_the_compiled_path_is_seeded_and_varies():
    gemma_lm = tiny_lm()
    inputs = prompts((4,), max_length=24)
    runs = []
    for _ in range(2):
        gemma_lm.compile(sampler=keras_gemma_top_k(seed=1))
        runs.append(generated(gemma_lm, inputs, stop_token_ids=None))
    np.testing.assert_array_equal(runs[0], runs[1])
    new_tokens = runs[0][0, 4:]
    # Random weights give a flat distribution: k=20 sampling varies.
    assert len(set(new_tokens.tolist())) > 3, new_tokens


@pytest.mark.skipif(keras.config.backend() != "torch", reason="PyTorch's compiled decode step")
def test_torch_random_sampling_keeps_the_model_step_one_graph():
    """`torch.multinomial` broke Dynamo's graph: the step fell back to
    compiling every layer apart and piece by piece (gemma3_270m's first
    top-p `generate()`: 3-6 min on a 2-core CPU). The model's part of the
    step now compiles as one graph, blocks traced once, and the sampler
    runs eagerly; all samplers but greedy share that compiled part."""
    import torch._dynamo

    gemma_lm = tiny_lm()
    inputs = prompts((4,), max_length=24)
    gemma_lm.compile(sampler=keras_gemma_top_k(seed=1))
    generated(gemma_lm, inputs, stop_token_ids=None)
    step = gemma_lm._torch_decode_step.compiled
    assert step.one_graph and gemma_lm.backbone.trace_blocks_once
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    import keras_hub

    gemma_lm.compile(sampler=keras_hub.samplers.TopPSampler(p=0.9, seed=1))
    generated(gemma_lm, inputs, stop_token_ids=None)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # Reused.


def keras_gemma_top_k(seed):
    import keras_hub

    return keras_hub.samplers.TopKSampler(k=20, seed=seed)


def compile_count(gemma_lm):
    """How many programs the backend has compiled for `generate()` so far."""
    backend = keras.config.backend()
    if backend == "tensorflow":
        return gemma_lm.generate_function.compiled.experimental_get_tracing_count()
    if backend == "torch":
        import torch._dynamo

        return torch._dynamo.utils.counters["stats"]["unique_graphs"]
    return JAX_COMPILES[0]


JAX_COMPILES = [0]


@pytest.fixture(scope="module", autouse=True)
def count_jax_compiles():
    if keras.config.backend() == "jax":
        import jax.monitoring

        def listener(event, duration, **kwargs):
            if event == "/jax/core/compile/backend_compile_duration":
                JAX_COMPILES[0] += 1

        jax.monitoring.register_event_duration_secs_listener(listener)
    yield


def test_second_generate_with_same_shapes_does_not_recompile():
    if keras.config.backend() == "torch":
        import torch._dynamo

        # Dynamo's counters are process-wide: count this test's graphs only.
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
    gemma_lm = tiny_lm(SLIDING)
    inputs = prompts()
    earlier = JAX_COMPILES[0] if keras.config.backend() == "jax" else 0  # Process-wide.
    generated(gemma_lm, inputs, stop_token_ids=None)
    before = compile_count(gemma_lm)
    assert before > earlier  # This model's first generate() compiled.
    if keras.config.backend() == "torch":
        import torch._dynamo

        # The whole decode step is one graph (two: the first step's cache
        # aliases keys and values); graph breaks would mean eager fallbacks.
        assert before <= 2 and not torch._dynamo.utils.counters["graph_break"]
    # New prompt contents, same shapes and prefill bucket: nothing compiles.
    other = prompts((5, 6))
    generated(gemma_lm, other, stop_token_ids=None)
    generated(gemma_lm, inputs, stop_token_ids=None)
    assert compile_count(gemma_lm) == before


@pytest.mark.skipif(keras.config.backend() != "torch", reason="Dynamo's recompile limit")
def test_torch_generates_at_more_shapes_than_dynamos_default_limit():
    """Dynamo keeps 8 compiled versions of one code object per process, and
    every model's decode step is the same code: the ninth batch size (or
    model) failed with "recompile limit exceeded"."""
    import torch._dynamo

    torch._dynamo.reset()  # No versions from earlier tests.
    # Dynamo's default lowered to 2 (each compile takes ~17 s here; ten
    # batch sizes took 3 min): the step's own limit must outrank it.
    # Dynamo's own patch(), not monkeypatch: undoing a monkeypatch deletes
    # the setting from Dynamo's config module (every later compile failed).
    with torch._dynamo.config.patch(recompile_limit=2):
        gemma_lm = tiny_lm()
        for batch_size in range(1, 5):
            fast = generated(gemma_lm, prompts(lengths=(5,) * batch_size), stop_token_ids=None)
    assert gemma_lm._torch_decode_step.compiled.one_graph and gemma_lm.backbone.trace_blocks_once
    gemma_lm.compile(sampler="greedy", run_eagerly=True)
    np.testing.assert_array_equal(fast, generated(gemma_lm, prompts(lengths=(5,) * 4), stop_token_ids=None))


@pytest.mark.skipif(keras.config.backend() != "jax", reason="JAX's jit options")
def test_jax_generate_compiles_with_wide_vectors_on_cpu(monkeypatch):
    """JAX's generate() is compiled with 512-bit vectors for XLA's own loops
    on CPU (int8 decoding ~12% faster on AVX-512), nothing on accelerators;
    and still generates KerasHub's way (the sampler's seed advances)."""
    import jax

    options = []
    jit = jax.jit

    def recording_jit(*args, **kwargs):
        options.append(kwargs.get("compiler_options"))
        return jit(*args, **kwargs)

    monkeypatch.setattr(jax, "jit", recording_jit)
    gemma_lm = tiny_lm()
    gemma_lm.compile(sampler=keras_gemma_top_k(seed=3))
    seed = keras.ops.convert_to_numpy(gemma_lm.sampler.seed_generator.state).copy()
    generated(gemma_lm, prompts(), stop_token_ids=None)
    expected = {"xla_cpu_prefer_vector_width": 512} if jax.default_backend() == "cpu" else None
    assert expected in options
    new_seed = keras.ops.convert_to_numpy(gemma_lm.sampler.seed_generator.state)
    assert not np.array_equal(seed, new_seed)


def test_shorter_generation_is_the_prefix_and_shares_the_compiled_step():
    """PyTorch compiles its decode step per shape, for minutes on a big
    model: lengths in one bucket share it. Every backend: a shorter
    generation is the longer one's prefix."""
    if keras.config.backend() == "torch":
        import torch._dynamo

        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
    gemma_lm = tiny_lm(SLIDING)
    inputs = prompts()
    longer = generated(gemma_lm, inputs, stop_token_ids=None)
    before = compile_count(gemma_lm)
    for length in (9, 14):  # The prompts are 7 and 3 tokens long.
        shorter = {key: value[:, :length] for key, value in inputs.items()}
        np.testing.assert_array_equal(
            generated(gemma_lm, shorter, stop_token_ids=None), longer[:, :length]
        )
    if keras.config.backend() == "torch":
        assert compile_count(gemma_lm) == before


def test_padding_that_is_a_stop_id_does_not_end_generation():
    """Prompts padded with a stop id (`<eos>` as the pad, as transformers
    users pad) or stop ids that include the pad id (`[eos, pad]`) ended
    generation before any token (one token on compiled PyTorch): the stop
    check read the positions not generated yet."""
    gemma_lm = tiny_lm(SLIDING)
    inputs = prompts()
    free = generated(gemma_lm, inputs, stop_token_ids=None)
    stop = int(free[1, 3])  # The short prompt's first new token.
    prompt_mask = inputs["padding_mask"].astype(bool)
    stops = (free == stop) & ~prompt_mask
    expected_mask = np.cumsum(stops, axis=1) - stops == 0
    for padding, stop_ids in ((stop, [stop]), (0, [stop, 0])):
        padded = dict(inputs, token_ids=np.where(prompt_mask, inputs["token_ids"], padding).astype("int32"))
        out = gemma_lm.generate(padded, stop_token_ids=stop_ids)
        token_ids, mask = np.asarray(out["token_ids"]), np.asarray(out["padding_mask"]).astype(bool)
        np.testing.assert_array_equal(mask, expected_mask)
        np.testing.assert_array_equal(token_ids[mask], free[mask])
        # Past the stop: what was sampled before every row stopped, or the padding.
        assert np.all((token_ids == free) | (token_ids == padding) | mask)
    # KerasHub's `generate_step` takes them as an array too.
    step = gemma_lm.generate_step(padded, np.array(stop_ids))
    np.testing.assert_array_equal(np.asarray(step["padding_mask"]).astype(bool), expected_mask)


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_low_precision_generation_stays_close_to_float32(dtype):
    reference = tiny_lm()
    inputs = {key: value[:, :12] for key, value in prompts((12, 12), 12).items()}
    expected = keras.ops.convert_to_numpy(reference(inputs))
    if dtype == "int8":
        gemma_lm = tiny_lm()
        gemma_lm.quantize("int8")
        backbone = gemma_lm.backbone
        assert backbone.get_layer("decoder_block_0").attention.query_dense.kernel.dtype == "int8"
        assert backbone.token_embedding.quantization_mode == "int8"
    else:
        gemma_lm = tiny_lm(dtype="bfloat16")
    logits = keras.ops.convert_to_numpy(keras.ops.cast(gemma_lm(inputs), "float32"))
    # Relative to the largest logit: int8 per-channel weights ~1%, bf16 ~2%.
    error = np.abs(logits - expected).max() / np.abs(expected).max()
    assert error < 0.05, error
    # Generation runs compiled in that precision.
    tokens = generated(gemma_lm, prompts(), stop_token_ids=None)
    assert tokens.shape == (2, 20) and (tokens >= 0).all() and (tokens < VOCABULARY).all()
    if keras.config.backend() == "torch":  # Each block kind traced once, not every block.
        assert gemma_lm.backbone.trace_blocks_once


def dequantized_copy(quantized):
    """A float model holding the dequantized weights of the int8 `quantized`
    (built from `tiny_lm()`, like it)."""
    reference = tiny_lm()
    layers = {layer.path: layer for layer in reference.backbone._flatten_layers()}
    count = 0
    for layer in quantized.backbone._flatten_layers():
        if getattr(layer, "quantization_mode", None) != "int8":
            continue
        count += 1
        target = layers[layer.path]
        if isinstance(layer, keras.layers.ReversibleEmbedding):
            table = keras.ops.convert_to_numpy(layer._embeddings).astype("float32")
            scale = keras.ops.convert_to_numpy(layer.embeddings_scale)
            target.embeddings.assign(table / scale[:, None])
        else:
            kernel = keras.ops.convert_to_numpy(layer._kernel).astype("float32")
            scale = keras.ops.convert_to_numpy(layer._adjust_scale_for_dequant(layer.kernel_scale))
            target.kernel.assign(kernel / scale)
    assert count == 1 + 7 * helpers.TINY_MQA["num_layers"]
    return reference


@pytest.mark.parametrize("spelling", ["causal_lm", "backbone", "config_string"])
def test_int8_quantizes_the_weights_only(spelling):
    """`quantize("int8")` rounds the weights and nothing else: the logits
    equal a float model's holding the dequantized weights. Keras' default
    int8 config also rounds the activations (checked: ~1% off)."""
    quantized = tiny_lm()
    if spelling == "causal_lm":
        quantized.quantize("int8")
    elif spelling == "backbone":
        quantized.backbone.quantize("int8")
    else:
        quantized.quantize(config="int8")  # Keras' older spelling.
    reference = dequantized_copy(quantized)
    inputs = {key: value[:, :12] for key, value in prompts((12, 12), 12).items()}
    expected = keras.ops.convert_to_numpy(reference(inputs))
    logits = keras.ops.convert_to_numpy(quantized(inputs))
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_int8_decoding_one_row_equals_the_dequantized_model():
    """Batch 1, compiled: every decoding step multiplies one row (on CPU
    from the int8 kernels, `one_row_product_in_place`); the greedy tokens equal
    the float model's with the dequantized weights. On PyTorch the decode
    step stays one graph (Keras' int8 product broke it into pieces)."""
    quantized = tiny_lm()
    quantized.quantize("int8")
    reference = dequantized_copy(quantized)
    inputs = {key: value[:1] for key, value in prompts().items()}
    np.testing.assert_array_equal(
        generated(quantized, inputs, stop_token_ids=None),
        generated(reference, inputs, stop_token_ids=None),
    )
    if keras.config.backend() == "torch":
        assert quantized._torch_decode_step.compiled.one_graph


def test_int8_kernels_laid_out_for_decoding_save_load_and_train_unchanged(tmp_path):
    """PyTorch CPU: the compiled decode step stores each int8 kernel with
    its contracted axes innermost (`lay_out_kernels_for_decoding`), a
    view of the same shape and values. Weights saved afterwards load into a
    fresh model (Keras' layout) with the same logits (to float32 rounding), and LoRA training
    gives the same losses in either layout (compiled, against eager)."""
    quantized = tiny_lm()
    quantized.quantize("int8")
    output_kernel = quantized.backbone.transformer_layers[0].attention.output_dense._kernel
    before = keras.ops.convert_to_numpy(output_kernel)
    generated(quantized, {key: value[:1] for key, value in prompts().items()}, stop_token_ids=None)
    laid_out = keras.config.backend() == "torch"
    if laid_out:
        attention = quantized.backbone.transformer_layers[0].attention
        # query [heads, D, H]: D innermost; output [heads, H, D]: heads and H.
        assert attention.query_dense._kernel.value.stride()[1] == 1
        assert output_kernel.value.stride() == (16, 1, 16 * 4)
        assert quantized.backbone.transformer_layers[0].ffw_linear._kernel.value.stride()[0] == 1
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(output_kernel), before)
    quantized.backbone.save_weights(tmp_path / "int8.weights.h5")

    fresh = tiny_lm(seed=1)
    fresh.quantize("int8")
    fresh.backbone.load_weights(tmp_path / "int8.weights.h5")
    if laid_out:
        assert fresh.backbone.transformer_layers[0].attention.output_dense._kernel.value.is_contiguous()
    inputs = {key: value[:, :12] for key, value in prompts((12, 12), 12).items()}
    # Equal up to float32 rounding: the layouts take different BLAS products.
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(fresh(inputs)), keras.ops.convert_to_numpy(quantized(inputs)),
        rtol=1e-5, atol=1e-6,
    )

    def lora_losses(gemma_lm, jit_compile):
        keras.utils.set_random_seed(0)
        gemma_lm.backbone.enable_lora(2, target_layer_names="all")
        gemma_lm.compile(optimizer=keras.optimizers.Adam(1e-2), jit_compile=jit_compile)
        labels = np.roll(inputs["token_ids"], -1, axis=1)
        return [gemma_lm.train_on_batch(inputs, labels, return_dict=True)["loss"] for _ in range(3)]

    expected = lora_losses(fresh, jit_compile=False)
    assert expected[2] < expected[0]
    np.testing.assert_allclose(lora_losses(quantized, jit_compile="auto"), expected, rtol=1e-5)


@pytest.mark.skipif(
    keras.config.backend() == "tensorflow", reason="TensorFlow is the backend here"
)
def test_generates_without_tensorflow_installed():
    """JAX and PyTorch need no TensorFlow (the GPU machines' image has none):
    the package imports, loads a checkpoint, tokenizes (KerasHub falls back
    to the sentencepiece package) and generates text without it."""
    code = """
import sys
sys.modules["tensorflow"] = sys.modules["tensorflow_text"] = None  # Not installed.
import numpy as np, keras_gemma
from keras_gemma.checkpoints import hf
hf.write_transformers_weights(keras_gemma.GemmaBackbone(**CONFIG), sys.argv[1])
backbone = keras_gemma.GemmaBackbone.from_preset(sys.argv[1])
with open(sys.argv[2], "rb") as f:
    tokenizer = keras_gemma.GemmaTokenizer(proto=f.read())
try:
    keras_gemma.GemmaTokenizer(proto=b"not a model")
except ValueError as e:
    print("bad proto:", type(e).__name__)
preprocessor = keras_gemma.GemmaCausalLMPreprocessor(tokenizer, sequence_length=8)
gemma_lm = keras_gemma.GemmaCausalLM(backbone, preprocessor=preprocessor)
text = gemma_lm.generate("the quick", max_length=12, stop_token_ids=None)
print("generated", text.startswith("the quick"))
gemma_lm.compile(optimizer="adam")
try:  # In-memory strings: KerasHub's pipeline needs Grain or TensorFlow.
    gemma_lm.fit(["the quick brown fox"], batch_size=1)
except ImportError as e:
    print("fit:", "pip install grain" in str(e))
""".replace("CONFIG", repr(bench.CONFIGS["tiny"]))
    with tempfile.TemporaryDirectory() as weights:
        proto = os.path.join(weights, "tokenizer.model")
        with open(proto, "wb") as f:
            f.write(helpers.train_sentencepiece())
        done = subprocess.run(
            [sys.executable, "-c", code, weights, proto], capture_output=True, text=True,
            env={**os.environ, "KERAS_BACKEND": keras.config.backend()}, timeout=300,
        )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-7:] == [
        "bad", "proto:", "ValueError", "generated", "True", "fit:", "True",
    ]


@pytest.mark.skipif(keras.config.backend() != "torch", reason="PyTorch's compile modes")
def test_torch_traces_one_block_per_kind_with_the_same_tokens(monkeypatch):
    """By default Dynamo traces one decoder block of each kind (sliding,
    global) and reuses it for the others, on their own weights;
    `KERAS_GEMMA_TORCH_COMPILE=step` traces the whole step. The tokens are
    eager decoding's."""
    from torch._dynamo import symbolic_convert

    traced_blocks = []
    inline_call = symbolic_convert.InliningInstructionTranslator.inline_call_

    def recorded(tracer):
        if tracer.f_code.co_name == "call" and tracer.f_code.co_filename.endswith("decoder_block.py"):
            traced_blocks.append(1)
        return inline_call(tracer)

    monkeypatch.setattr(symbolic_convert.InliningInstructionTranslator, "inline_call_", recorded)
    config = dict(SLIDING, num_layers=5, layer_types=["sliding", "global", "sliding", "sliding", "global"])
    gemma_lm = tiny_lm(config)
    inputs = prompts()
    runs = {}
    for mode in ("step", "1"):
        monkeypatch.setenv("KERAS_GEMMA_TORCH_COMPILE", mode)
        gemma_lm.compile(sampler="greedy")
        traced_blocks.clear()
        runs[mode] = generated(gemma_lm, inputs, stop_token_ids=None)
        runs[mode, "traced"] = len(traced_blocks)
    gemma_lm.compile(sampler="greedy", run_eagerly=True)
    eager = generated(gemma_lm, inputs, stop_token_ids=None)
    np.testing.assert_array_equal(runs["1"], eager)
    np.testing.assert_array_equal(runs["step"], eager)
    # Two of the five blocks traced, per compiled graph.
    assert runs["1", "traced"] * 5 == runs["step", "traced"] * 2, runs


@pytest.mark.skipif(keras.config.backend() != "torch", reason="PyTorch's compiled decode step")
def test_torch_a_step_that_is_no_graph_leaves_other_models_compiled():
    """An int8 model that quantizes its activations cannot compile its
    step as one graph. Compiled in pieces, it made Dynamo skip the step's
    code, which all models share: later models decoded eagerly, and those
    that had compiled failed on their third step ("Recompilation triggered
    with skip_guard_eval_unsafe stance"). It now decodes eagerly itself."""
    import torch._dynamo

    first = tiny_lm(seed=0)
    inputs = prompts()
    before = generated(first, inputs, stop_token_ids=None)
    no_graph = tiny_lm(seed=1)
    no_graph.quantize("int8", config=keras.quantizers.Int8QuantizationConfig())
    tokens = generated(no_graph, inputs, stop_token_ids=None)
    assert not no_graph._torch_decode_step.compiled.one_graph
    np.testing.assert_array_equal(generated(first, inputs, stop_token_ids=None), before)
    # A shape no other test compiles: a compiled step is a new graph.
    shape = dict(SLIDING, num_layers=4, layer_types=["sliding", "global"] * 2, intermediate_dim=48)
    later, eager = tiny_lm(shape, seed=2), tiny_lm(shape, seed=2)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = generated(later, inputs, stop_token_ids=None)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # Not eager.
    for model in (eager, no_graph):
        model.compile(sampler="greedy", run_eagerly=True)
    np.testing.assert_array_equal(compiled, generated(eager, inputs, stop_token_ids=None))
    np.testing.assert_array_equal(tokens, generated(no_graph, inputs, stop_token_ids=None))


@pytest.mark.skipif(keras.config.backend() != "torch", reason="PyTorch's compile modes")
def test_torch_step_falls_back_to_one_graph_where_blocks_are_no_regions(monkeypatch):
    import torch

    from keras_gemma.models import gemma_backbone

    call_block_traced_once = gemma_backbone.call_block_traced_once

    def untraceable_as_region(*args):
        torch._dynamo.graph_break()
        return call_block_traced_once(*args)

    monkeypatch.setattr(gemma_backbone, "call_block_traced_once", untraceable_as_region)
    gemma_lm = tiny_lm(SLIDING)
    fast = generated(gemma_lm, prompts(), stop_token_ids=None)
    assert not gemma_lm.backbone.trace_blocks_once  # Fell back.
    assert gemma_lm._torch_decode_step.compiled.one_graph
    gemma_lm.compile(sampler="greedy", run_eagerly=True)
    np.testing.assert_array_equal(fast, generated(gemma_lm, prompts(), stop_token_ids=None))


@pytest.mark.skipif(keras.config.backend() != "torch", reason="PyTorch's compile modes")
def test_torch_without_keyed_regions_compiles_one_graph(monkeypatch):
    from keras_gemma.models import compiled_generation

    monkeypatch.setattr(compiled_generation, "block_regions_available", lambda: False)
    gemma_lm = tiny_lm()
    gemma_lm.make_generate_function()
    assert not gemma_lm.backbone.trace_blocks_once
    assert gemma_lm._torch_decode_step.compiled.options == {"cpp_wrapper": True}


@pytest.mark.skipif(keras.config.backend() != "torch", reason="PyTorch's CUDA graphs")
def test_torch_cuda_graph_steps_copy_out_what_the_next_replay_overwrites(monkeypatch):
    """With `KERAS_GEMMA_TORCH_CUDAGRAPHS=1` each replay overwrites the last
    one's outputs, which the next step reads (seen on an H200: "accessing
    tensor output of CUDAGraphs that has been overwritten"). Each step
    starts a new replay and hands back copies. Forced here on the CPU,
    where Inductor leaves the graphs out: the tokens stay eager's (the GPU
    check runs this test on a GPU, graphs and all)."""
    import torch

    from keras_gemma.models import compiled_generation

    monkeypatch.setattr(compiled_generation, "_replays_cuda_graphs", lambda: True)
    steps_begun = []
    begin_step = torch.compiler.cudagraph_mark_step_begin

    def step_begun():
        steps_begun.append(1)
        begin_step()

    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", step_begun)
    step = compiled_generation.TorchCompiledStep
    run, call = step._run, step.__call__
    last_replay, handed_back = [], []

    def run_recorded(self, *args, **kwargs):
        last_replay[:] = [run(self, *args, **kwargs)]
        return last_replay[0]

    def call_checked(self, *args, **kwargs):
        # Compared at once: on a GPU the next replay overwrites the outputs.
        copies = call(self, *args, **kwargs)
        (outputs,) = last_replay
        for output, copy in zip(keras.tree.flatten(outputs), keras.tree.flatten(copies)):
            assert copy.data_ptr() != output.data_ptr()
            np.testing.assert_array_equal(copy.cpu().numpy(), output.cpu().numpy())
        handed_back.append(1)
        return copies

    monkeypatch.setattr(step, "_run", run_recorded)
    monkeypatch.setattr(step, "__call__", call_checked)
    gemma_lm = tiny_lm()
    inputs = prompts()
    fast = generated(gemma_lm, inputs, stop_token_ids=None)
    assert gemma_lm._torch_decode_step.compiled.options == {"triton.cudagraphs": True}
    assert len(steps_begun) == len(handed_back) > 1
    gemma_lm.compile(sampler="greedy", run_eagerly=True)
    np.testing.assert_array_equal(fast, generated(gemma_lm, inputs, stop_token_ids=None))


@pytest.mark.skipif(keras.config.backend() != "tensorflow", reason="TensorFlow's tracing")
def test_tensorflow_traces_one_block_per_kind_with_the_same_tokens(monkeypatch):
    """TensorFlow traces one decoder block of each structure per compiled
    function (prefill, decode step) and runs it on each block's weights;
    a block whose structure changes (LoRA on one block) gets its own. The
    tokens are eager decoding's."""
    traced = helpers.record_block_calls(monkeypatch)
    config = dict(SLIDING, num_layers=5, layer_types=["sliding", "global", "sliding", "sliding", "global"])
    gemma_lm = tiny_lm(config)
    inputs = prompts()
    # Two structures traced for prefill and decode (not 2 x 5 blocks); then
    # only the new one, the others' traces reused.
    for expected in (["decoder_block_0", "decoder_block_1"] * 2, ["decoder_block_2"] * 2):
        if expected[0] == "decoder_block_2":  # Block 2 alone gets adapters: a third structure.
            query = gemma_lm.backbone.transformer_layers[2].attention.query_dense
            query.enable_lora(2)
            query.lora_kernel_b.assign(np.random.default_rng(1).normal(size=query.lora_kernel_b.shape))
        gemma_lm.compile(sampler="greedy")
        traced.clear()
        compiled = generated(gemma_lm, inputs, stop_token_ids=None)
        assert traced == expected
        gemma_lm.compile(sampler="greedy", run_eagerly=True)
        np.testing.assert_array_equal(compiled, generated(gemma_lm, inputs, stop_token_ids=None))


def test_blocks_of_one_structure_share_a_key():
    from keras_gemma.layers import block_tracing

    blocks = tiny_lm(SLIDING).backbone.transformer_layers  # sliding, global, sliding
    block_tracing.mark_blocks_for_one_trace(blocks)
    keys = [block.structure_key for block in blocks]
    assert keys[0] == keys[2] != keys[1]
    blocks[0].attention.query_dense.enable_lora(2)  # Not the same function any more.
    block_tracing.mark_blocks_for_one_trace(blocks)
    assert blocks[0].structure_key not in (keys[0], blocks[2].structure_key)


def test_unknown_torch_compile_mode_is_a_clear_error(monkeypatch):
    gemma_lm = tiny_lm()
    monkeypatch.setenv("KERAS_GEMMA_TORCH_COMPILE", "yes")
    if keras.config.backend() == "torch":
        with pytest.raises(ValueError, match="KERAS_GEMMA_TORCH_COMPILE='yes' is not a choice"):
            gemma_lm.compile()
    else:  # Only PyTorch reads it.
        gemma_lm.compile()


@pytest.mark.skipif(keras.config.backend() != "tensorflow", reason="TensorFlow's tracing heuristics")
def test_tensorflow_does_not_warn_of_retracing_across_shapes_and_models(caplog):
    """Each prompt bucket, sampler and model traces its own generate
    function by design; TensorFlow's "5 out of the last 5 calls ...
    triggered tf.function retracing" warning (after `quantize()`, on a
    reloaded int8 preset) suggested a mistake of the user's."""
    gemma_lm = tiny_lm()
    with caplog.at_level("WARNING", logger="tensorflow"):
        for max_length in (8, 20, 40, 70):
            generated(gemma_lm, prompts((3,), max_length=max_length), stop_token_ids=None)
        gemma_lm.quantize("int8")
        for max_length in (8, 20):
            generated(gemma_lm, prompts((3,), max_length=max_length), stop_token_ids=None)
    assert not [r for r in caplog.records if "retracing" in r.getMessage()]


def recorded_prefill_widths(gemma_lm, monkeypatch):
    """A list that gets the width of every prefill (a call with more than
    one token) of `gemma_lm`, and the unpatched `call_with_cache`. (A list
    appended at every decode step, inside PyTorch's compiled step, made
    Dynamo recompile the step at each.)"""
    widths = []
    call_with_cache = gemma_lm.backbone.call_with_cache

    def recording(token_ids, *args, **kwargs):
        if token_ids.shape[1] > 1:
            widths.append(token_ids.shape[1])
        return call_with_cache(token_ids, *args, **kwargs)

    monkeypatch.setattr(gemma_lm.backbone, "call_with_cache", recording)
    return widths, call_with_cache


@pytest.mark.parametrize(
    "config, query_block", [(helpers.TINY_MQA, None), (SLIDING, 16)], ids=["global", "sliding_query_blocks"]
)
def test_max_new_tokens_prefills_every_prompt_whole(config, query_block, monkeypatch):
    """With max_new_tokens the prompts are aligned at their ends: each is
    prefilled whole and the batch decodes max_new_tokens steps (KerasHub's
    way, a 40-token prompt beside a 3-token one took 37 decode steps before
    its first new token). Each row's tokens, stop and mask equal its
    prompt's alone (sliding window 4, shorter than the length gap; prefill
    attended in query blocks too)."""
    from keras_gemma.layers import attention

    if query_block:
        monkeypatch.setattr(attention, "QUERY_BLOCK", query_block)
    gemma_lm = tiny_lm(config)
    lengths, new_tokens = (3, 40, 21), 5
    inputs = prompts(lengths, max_length=48)
    prefill_widths, call_with_cache = recorded_prefill_widths(gemma_lm, monkeypatch)
    batch = generated(gemma_lm, inputs, max_new_tokens=new_tokens, stop_token_ids=None)
    assert max(prefill_widths) >= max(lengths)  # The shortest's bucket (16) before.
    monkeypatch.setattr(gemma_lm.backbone, "call_with_cache", call_with_cache)
    for row, length in enumerate(lengths):
        alone = {key: value[[row], : length + new_tokens] for key, value in inputs.items()}
        np.testing.assert_array_equal(batch[row, : length + new_tokens], generated(gemma_lm, alone, stop_token_ids=None)[0])
        assert not batch[row, length + new_tokens:].any()
    # A stop id that row 0 produces as its second new token.
    stop = int(batch[0, lengths[0] + 1])
    stopped = gemma_lm.generate(inputs, max_new_tokens=new_tokens, stop_token_ids=[stop])
    for row, length in enumerate(lengths):
        alone = {key: value[[row], : length + new_tokens] for key, value in inputs.items()}
        expected = gemma_lm.generate(alone, stop_token_ids=[stop])
        mask = np.asarray(stopped["padding_mask"]).astype(bool)[row, : length + new_tokens]
        np.testing.assert_array_equal(mask, np.asarray(expected["padding_mask"]).astype(bool)[0])
        np.testing.assert_array_equal(
            np.asarray(stopped["token_ids"])[row, : length + new_tokens][mask], np.asarray(expected["token_ids"])[0][mask]
        )
    assert not np.asarray(stopped["padding_mask"])[0, lengths[0] + 2:].any()


def test_max_length_aligns_prompts_far_apart_where_rows_can_stop(monkeypatch):
    """With max_length and stop ids, prompts at least `MIN_GAP_TO_ALIGN`
    tokens apart are aligned too (each row keeps its room): the long
    prompt no longer waits one decode step per extra token before its
    first new one. Each row's tokens, stop and mask equal its prompt's
    alone; without stop ids (no row can end early, so no step to save),
    or where the width would more than double, the batch decodes the old
    way, with no wider shape to compile."""
    from keras_gemma.models import compiled_generation

    gemma_lm = tiny_lm(SLIDING)
    lengths = (3, 3 + compiled_generation.MIN_GAP_TO_ALIGN + 3)  # Aligned with 128 columns more.
    inputs = prompts(lengths, max_length=128)
    prefill_widths, call_with_cache = recorded_prefill_widths(gemma_lm, monkeypatch)
    free = generated(gemma_lm, inputs, stop_token_ids=None)
    assert prefill_widths == [16]  # The shortest prompt's bucket.
    stop = int(free[0, lengths[0] + 1])  # Row 0's second new token.
    stopped = gemma_lm.generate(inputs, stop_token_ids=[stop])
    assert max(prefill_widths) >= lengths[1]
    monkeypatch.setattr(gemma_lm.backbone, "call_with_cache", call_with_cache)
    token_ids, mask = np.asarray(stopped["token_ids"]), np.asarray(stopped["padding_mask"]).astype(bool)
    assert token_ids.shape == inputs["token_ids"].shape
    for row in range(len(lengths)):
        alone = gemma_lm.generate({key: value[[row]] for key, value in inputs.items()}, stop_token_ids=[stop])
        np.testing.assert_array_equal(mask[row], np.asarray(alone["padding_mask"]).astype(bool)[0])
        np.testing.assert_array_equal(token_ids[row][mask[row]], np.asarray(alone["token_ids"])[0][mask[row]])
    assert not mask[0, lengths[0] + 2:].any()
    narrow = {key: value[:, :127] for key, value in inputs.items()}
    assert compiled_generation.aligned_for_generation(narrow, None, [stop]) is narrow
