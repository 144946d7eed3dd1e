"""`GemmaBackbone.get_layout_map`: KerasHub's layouts, with dimensions the
mesh does not divide left whole when the model's config is given."""

import os
import subprocess
import sys
import textwrap

import keras
import keras_hub
import pytest

import keras_gemma
from tests import helpers


def mesh(batch, model):
    devices = [f"cpu:{i}" for i in range(batch * model)]
    return keras.distribution.DeviceMesh((batch, model), ("batch", "model"), devices)


def axes(layout_map, path):
    return tuple(layout_map[path].axes)


def test_layouts_are_keras_hubs_where_the_mesh_divides_the_weights():
    ours = keras_gemma.GemmaBackbone.get_layout_map(mesh(2, 4), config="gemma_7b_en")
    theirs = keras_hub.models.GemmaBackbone.get_layout_map(mesh(2, 4))
    for path in [
        "token_embedding/embeddings",
        "decoder_block_3/attention/query/kernel",
        "decoder_block_3/attention/key/kernel",
        "decoder_block_3/attention/value/kernel",
        "decoder_block_3/attention/attention_output/kernel",
        "decoder_block_3/ffw_gating/kernel",
        "decoder_block_3/ffw_gating_2/kernel",
        "decoder_block_3/ffw_linear/kernel",
    ]:
        assert axes(ours, path) == axes(theirs, path), path
    # Norms (and Gemma 3's query/key norms) stay replicated.
    for path in ["decoder_block_3/pre_attention_norm/scale", "decoder_block_3/attention/query_norm/scale"]:
        assert ours[path] is None and theirs[path] is None


def test_a_single_key_value_head_is_not_split():
    layout_map = keras_gemma.GemmaBackbone.get_layout_map(mesh(1, 2), config="gemma3_270m")
    assert axes(layout_map, "decoder_block_0/attention/key/kernel") == (None, "batch", None)
    assert axes(layout_map, "decoder_block_0/attention/value/kernel") == (None, "batch", None)
    assert axes(layout_map, "decoder_block_0/attention/query/kernel") == ("model", "batch", None)
    # 4 query heads over 8 model devices: whole too; a backbone config works.
    config = keras_gemma.GemmaBackbone(vocabulary_size=64, **helpers.TINY_MQA).get_config()
    layout_map = keras_gemma.GemmaBackbone.get_layout_map(mesh(1, 8), config=config)
    assert axes(layout_map, "decoder_block_0/attention/query/kernel") == (None, "batch", None)
    preset_config = {"class_name": "GemmaBackbone", "config": config}  # A preset's config.json.
    layout_map = keras_gemma.GemmaBackbone.get_layout_map(mesh(1, 8), config=preset_config)
    assert axes(layout_map, "decoder_block_0/attention/query/kernel") == (None, "batch", None)
    assert axes(layout_map, "decoder_block_0/ffw_linear/kernel") == ("model", "batch")
    # Without a config: KerasHub's layouts as they are.
    layout_map = keras_gemma.GemmaBackbone.get_layout_map(mesh(1, 2))
    assert axes(layout_map, "decoder_block_0/attention/key/kernel") == ("model", "batch", None)


def test_bad_arguments_say_what_to_pass():
    with pytest.raises(TypeError, match="DeviceMesh"):
        keras_gemma.GemmaBackbone.get_layout_map((1, 2))
    with pytest.raises(ValueError, match=r"model_parallel_dim_name='tensor' is not an axis.*'batch', 'model'"):
        keras_gemma.GemmaBackbone.get_layout_map(mesh(1, 2), model_parallel_dim_name="tensor")
    with pytest.raises(ValueError, match="Did you mean 'gemma3_270m'"):
        keras_gemma.GemmaBackbone.get_layout_map(mesh(1, 2), config="gemma3_207m")


def test_an_int4_models_packed_weights_get_layouts_of_their_rank():
    """Keras stores an int4 kernel packed as 2-D: with the float kernels'
    rank-3 layouts JAX refused to load an int4 model."""
    backbone = keras_gemma.GemmaBackbone(vocabulary_size=64, **helpers.TINY_MQA)
    backbone.quantize("int4")
    layout_map = keras_gemma.GemmaBackbone.get_layout_map(mesh(1, 2), config=backbone.get_config())
    for variable in backbone.weights:
        layout = layout_map[variable.path]
        assert layout is None or len(layout.axes) == len(variable.shape), variable.path
    # Rows take the float kernel's first axis' layout (the heads, the MLP's
    # inner dimension); the single key/value head stays whole.
    assert axes(layout_map, "decoder_block_0/attention/query/kernel") == ("model", None)
    assert axes(layout_map, "decoder_block_0/attention/key/kernel") == (None, None)
    assert axes(layout_map, "decoder_block_0/attention/attention_output/kernel") == ("model", "batch")
    assert axes(layout_map, "decoder_block_1/ffw_gating/kernel") == ("batch", "model")
    assert axes(layout_map, "decoder_block_1/ffw_linear/kernel") == ("model", "batch")
    assert axes(layout_map, "token_embedding/embeddings") == ("model", "batch")


def run_on_two_cpu_devices(script):
    """Run `script` in a new process (JAX fixes its devices when it starts)
    that sees two virtual CPU devices; it prints "ok" when it passes."""
    # Only this flag: after `make test`'s XLA_FLAGS, JAX still saw one device.
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


@pytest.mark.skipif(keras.config.backend() != "jax", reason="keras.distribution.ModelParallel runs on JAX")
def test_a_sharded_model_computes_trains_and_generates_as_one_device():
    """On two virtual CPU devices: a multi-query model, whose single key/value head KerasHub's
    layout map splits (JAX: "IndivisibleError")."""
    script = textwrap.dedent("""
        import keras, numpy as np, keras_gemma
        from tests import helpers

        config = dict(vocabulary_size=64, **helpers.TINY_MQA)
        def causal_lm():
            lm = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(**config), preprocessor=None)
            lm.compile(optimizer=keras.optimizers.SGD(0.1))
            return lm
        single = causal_lm()
        tokens = helpers.random_token_ids(64, (2, 9))
        x = {"token_ids": tokens[:, :-1], "padding_mask": np.ones_like(tokens[:, :-1])}
        prompt = {"token_ids": tokens[:, :6], "padding_mask": np.ones_like(tokens[:, :6])}

        weights = single.get_weights()
        expected_logits = np.asarray(single(x))
        expected_tokens = np.asarray(single.generate(prompt, max_length=12, stop_token_ids=None)["token_ids"])
        expected_loss = single.train_on_batch(x, tokens[:, 1:])

        mesh = keras.distribution.DeviceMesh((1, 2), ("batch", "model"), keras.distribution.list_devices())
        layout_map = keras_gemma.GemmaBackbone.get_layout_map(mesh, config=config)
        with keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch").scope():
            sharded = causal_lm()
            sharded.set_weights(weights)
            key = sharded.backbone.get_layer("decoder_block_0").attention.key_dense.kernel
            query = sharded.backbone.get_layer("decoder_block_0").attention.query_dense.kernel
            assert tuple(query.value.sharding.spec) == ("model", "batch", None), query.value.sharding
            assert tuple(key.value.sharding.spec) == (None, "batch", None), key.value.sharding
            np.testing.assert_allclose(np.asarray(sharded(x)), expected_logits, atol=1e-5)
            tokens_out = sharded.generate(prompt, max_length=12, stop_token_ids=None)["token_ids"]
            np.testing.assert_array_equal(np.asarray(tokens_out), expected_tokens)
            np.testing.assert_allclose(sharded.train_on_batch(x, tokens[:, 1:]), expected_loss, rtol=1e-5)
        print("ok")
    """)
    run_on_two_cpu_devices(script)


@pytest.mark.skipif(keras.config.backend() != "jax", reason="keras.distribution.ModelParallel runs on JAX")
def test_a_sharded_int4_model_computes_as_one_device():
    script = textwrap.dedent("""
        import keras, numpy as np, keras_gemma
        from tests import helpers

        single = keras_gemma.GemmaBackbone(vocabulary_size=64, **helpers.TINY_MQA)
        single.quantize("int4")
        config = single.get_config()
        tokens = helpers.random_token_ids(64, (2, 8))
        x = {"token_ids": tokens, "padding_mask": np.ones_like(tokens)}
        expected_logits = np.asarray(keras_gemma.GemmaCausalLM(single, preprocessor=None)(x))

        mesh = keras.distribution.DeviceMesh((1, 2), ("batch", "model"), keras.distribution.list_devices())
        layout_map = keras_gemma.GemmaBackbone.get_layout_map(mesh, config=config)
        with keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch").scope():
            sharded = keras_gemma.GemmaBackbone.from_config(config)
            sharded.set_weights(single.get_weights())
            query = sharded.get_layer("decoder_block_0").attention.query_dense._kernel
            assert tuple(query.value.sharding.spec) == ("model", None), query.value.sharding
            logits = keras_gemma.GemmaCausalLM(sharded, preprocessor=None)(x)
            np.testing.assert_allclose(np.asarray(logits), expected_logits, atol=1e-5)
        print("ok")
    """)
    run_on_two_cpu_devices(script)
