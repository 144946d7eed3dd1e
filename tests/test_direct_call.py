"""On PyTorch, built layers skip Keras' `Layer.__call__` bookkeeping
(`keras_gemma/layers/direct_call.py`), eagerly and while torch.compile
traces, and compute the same."""

import keras
import numpy as np
import pytest

from keras_gemma.layers import direct_call
from keras_gemma.layers.dense import EinsumDense
from keras_gemma.layers.rms_normalization import RMSNormalization


@pytest.fixture
def keras_calls(monkeypatch):
    """The layers that went through `Layer.__call__`."""
    calls = []
    keras_call = keras.layers.Layer.__call__

    def recorded(self, *args, **kwargs):
        calls.append(type(self).__name__)
        return keras_call(self, *args, **kwargs)

    monkeypatch.setattr(keras.layers.Layer, "__call__", recorded)
    return calls


def test_dynamo_is_tracing_only_inside_torch_compile():
    seen = []

    def traced(x):
        seen.append(direct_call.dynamo_is_tracing())
        return x + 1

    backend = keras.config.backend()
    if backend == "torch":
        import torch

        torch.compile(traced, backend="eager")(torch.ones(2))
    elif backend == "jax":
        import jax

        jax.jit(traced)(np.ones(2))
    else:
        import tensorflow as tf

        tf.function(traced)(np.ones(2))
    assert seen == [backend == "torch"]
    assert direct_call.dynamo_is_tracing() is False


@pytest.mark.parametrize("dtype", ["float32", "mixed_bfloat16", "int8"])
def test_direct_call_computes_what_keras_call_does(dtype, keras_calls, monkeypatch):
    dense = EinsumDense("btd,df->btf", output_shape=(None, 8), dtype=dtype.replace("int8", "float32"))
    norm = RMSNormalization(dtype=dense.dtype_policy)
    dense.build((None, None, 4))
    norm.build((None, None, 8))
    if dtype == "int8":  # Keras runs `quantized_call` then.
        dense.quantize("int8")
    x = np.random.default_rng(0).normal(size=(2, 3, 4)).astype("float32")
    monkeypatch.setattr(direct_call, "skips_keras_call", lambda: False)
    expected = norm(dense(x))
    assert keras_calls == ["EinsumDense", "RMSNormalization"]

    keras_calls.clear()
    monkeypatch.setattr(direct_call, "skips_keras_call", lambda: True)
    # Outer calls pass `training` to every layer (RMSNormalization takes none).
    got = norm(dense(keras.ops.convert_to_tensor(x), training=True), training=True)
    assert keras_calls == []
    # Mixed precision: inputs and kernels in bfloat16, as Keras' call does.
    assert keras.backend.standardize_dtype(got.dtype) == norm.compute_dtype
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(got), keras.ops.convert_to_numpy(expected))


def test_keras_call_kept_where_training_must_be_resolved_not_built_or_symbolic(keras_calls, monkeypatch):
    monkeypatch.setattr(direct_call, "skips_keras_call", lambda: True)
    dense = EinsumDense("btd,df->btf", output_shape=(None, 8))
    x = np.ones((1, 3, 4), "float32")
    dense(x)  # Not built yet: Keras builds it.
    assert keras_calls == ["EinsumDense"]
    dense(x)  # Its float `call` ignores `training`.
    assert keras_calls == ["EinsumDense"]
    symbolic = dense(keras.KerasTensor((None, 3, 4)))  # A functional model's graph.
    assert isinstance(symbolic, keras.KerasTensor) and symbolic.shape[-1] == 8
    assert keras_calls == ["EinsumDense", "EinsumDense"]
    dense.quantize("int8")
    dense(x)  # Quantized calls may use it (float8 updates its scales).
    assert keras_calls == ["EinsumDense", "EinsumDense", "EinsumDense"]
    keras_calls.clear()

    from keras_gemma.layers.decoder_block import GemmaDecoderBlock

    block = GemmaDecoderBlock(
        intermediate_dim=16, dropout=0.5,
        attention_config=dict(num_query_heads=2, num_key_value_heads=1, head_dim=4),
    )
    x = np.ones((1, 3, 8), "float32")
    block(x)  # Builds through Keras' call.
    assert keras_calls[0] == "GemmaDecoderBlock"
    keras_calls.clear()
    block(x)  # `training` comes from the outer call: Keras resolves it.
    assert keras_calls[0] == "GemmaDecoderBlock"
    keras_calls.clear()
    block(x, training=False)
    assert "GemmaDecoderBlock" not in keras_calls


def test_torch_generate_calls_no_keras_layer_call(keras_calls):
    """A real model on PyTorch: the eager prefill and the traced decode step
    of a built model take the direct path for every one of our layers (on
    JAX and TensorFlow nothing changes)."""
    if keras.config.backend() != "torch":
        pytest.skip("PyTorch only")
    import torch

    import keras_gemma
    from tests import helpers

    gemma_lm = keras_gemma.GemmaCausalLM(
        keras_gemma.GemmaBackbone(vocabulary_size=64, **helpers.TINY_MQA), preprocessor=None
    )
    token_ids = np.zeros((1, 8), "int32")
    token_ids[0, :3] = [5, 6, 7]
    inputs = {"token_ids": token_ids, "padding_mask": (token_ids != 0).astype("int32")}
    ours = {cls.__name__ for cls in direct_call.DirectCall.__subclasses__()}
    assert {"GemmaDecoderBlock", "GemmaAttention", "EinsumDense"} <= ours
    assert ours & set(keras_calls)  # Building the functional model called them through Keras.
    keras_calls.clear()

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KERAS_GEMMA_TORCH_COMPILE", "1")
        gemma_lm.compile(sampler="greedy")  # Compiled, not conftest's eager torch.
        gemma_lm.generate(inputs, stop_token_ids=None)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # Dynamo did trace.
    assert not ours & set(keras_calls), keras_calls


@pytest.mark.skipif(keras.config.backend() != "torch", reason="Dynamo is PyTorch's")
def test_dynamo_skips_the_keras_helpers_it_is_told_about(monkeypatch):
    """`shorten_keras_tracing`: Dynamo computes Keras' symbolic-tensor check
    and dtype helpers instead of interpreting them (half of gemma3_270m's
    tracing time), and the compiled result is unchanged."""
    import torch
    from torch._dynamo import symbolic_convert

    direct_call.shorten_keras_tracing()
    inlined = []
    inline_call = symbolic_convert.InliningInstructionTranslator.inline_call_

    def recorded(tracer):
        inlined.append(tracer.f_code.co_name)
        return inline_call(tracer)

    monkeypatch.setattr(symbolic_convert.InliningInstructionTranslator, "inline_call_", recorded)

    def step(x, y):
        return keras.ops.cast(keras.ops.matmul(x, y), "bfloat16")

    x, y = torch.randn(2, 3), torch.randn(3, 4)
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True)(x, y)
    assert "matmul" in inlined  # Keras' ops are traced...
    for helper in ("any_symbolic_tensors", "standardize_dtype", "result_type", "to_torch_dtype"):
        assert helper not in inlined  # ...but not these.
    np.testing.assert_array_equal(got.float().numpy(), step(x, y).float().numpy())
