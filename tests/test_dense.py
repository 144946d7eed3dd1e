import keras
import numpy as np
import pytest

from keras_gemma.layers.dense import EinsumDense
from keras_gemma.layers.dense import _is_matmul
from keras_gemma.layers.dense import one_row_product
from keras_gemma.layers.embedding import ReversibleEmbedding


@pytest.mark.parametrize(
    "equation, expected",
    [("btd,df->btf", True), ("btf,fd->btd", True), ("btd,ndh->btnh", False),
     ("btnh,nhd->btd", False), ("btd,fd->btf", False)],
)
def test_only_plain_matrix_products_take_the_matmul_path(equation, expected):
    assert _is_matmul(equation) is expected


@pytest.mark.parametrize("lora", [False, True])
def test_matmul_path_equals_keras_einsum_dense(lora):
    """Same outputs as Keras' layer on the same weights, with LoRA too."""
    x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype("float32")
    ours = EinsumDense("btd,df->btf", (None, 5))
    reference = keras.layers.EinsumDense("btd,df->btf", (None, 5))
    for layer in (ours, reference):
        layer.build(x.shape)
        if lora:
            layer.enable_lora(2)
    for mine, theirs in zip(ours.weights, reference.weights):
        mine.assign(np.random.default_rng(1).normal(size=mine.shape).astype("float32"))
        theirs.assign(mine.value)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(ours(x)), keras.ops.convert_to_numpy(reference(x)),
        atol=1e-5, rtol=0,
    )


# Decoding one token with batch 1: the products that `one_row_product`
# rewrites on TensorFlow (query, multi-query key/value, attention output).
ONE_ROW_CASES = [
    ("btd,ndh->btnh", (1, 1, 16), (4, 16, 8)),
    ("bsd,kdh->bskh", (1, 1, 16), (1, 16, 8)),
    ("btnh,nhd->btd", (1, 1, 4, 8), (4, 8, 16)),
]


def _random(shape, seed):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


@pytest.mark.parametrize("equation, x_shape, kernel_shape", ONE_ROW_CASES)
def test_one_row_product_equals_einsum(equation, x_shape, kernel_shape):
    x, kernel = _random(x_shape, 0), _random(kernel_shape, 1)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(one_row_product(equation, x, kernel)),
        np.einsum(equation, x, kernel), atol=1e-5, rtol=0,
    )


@pytest.mark.parametrize("equation, x_shape, kernel_shape", ONE_ROW_CASES)
def test_one_row_layer_equals_keras_einsum_dense_with_lora(equation, x_shape, kernel_shape):
    """The layer on one row (TensorFlow takes `one_row_product`) equals
    Keras' layer on the same weights, LoRA adapters included."""
    x = _random(x_shape, 0)
    output_shape = (None, *kernel_shape[:1], kernel_shape[2]) if len(x_shape) == 3 else (None, kernel_shape[2])
    ours, reference = EinsumDense(equation, output_shape), keras.layers.EinsumDense(equation, output_shape)
    for layer in (ours, reference):
        layer.build(x_shape)
        layer.enable_lora(2)
    for seed, (mine, theirs) in enumerate(zip(ours.weights, reference.weights)):
        mine.assign(_random(mine.shape, seed + 1))
        theirs.assign(mine.value)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(ours(x)), keras.ops.convert_to_numpy(reference(x)),
        atol=1e-5, rtol=0,
    )


def test_one_row_logits_equal_the_table_product():
    layer = ReversibleEmbedding(50, 16)
    layer.build((1, 1))
    layer.embeddings.assign(_random((50, 16), 1))
    x = _random((1, 1, 16), 0)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer(x, reverse=True)),
        x @ keras.ops.convert_to_numpy(layer.embeddings).T, atol=1e-5, rtol=0,
    )


@pytest.mark.skipif(keras.config.backend() != "tensorflow", reason="TensorFlow's XLA")
@pytest.mark.parametrize("case", [*ONE_ROW_CASES, "logits"])
def test_tensorflow_one_row_products_stay_blas_calls(case):
    """Compiled with XLA, every one-row product stays a standalone `dot`
    (a BLAS call) instead of a dot fused into a naive loop together with
    the kernel's reshape and the norm before it (3-10x slower)."""
    import tensorflow as tf

    if case == "logits":
        layer = ReversibleEmbedding(300, 64)
        layer.build((1, 1))
        x, call = tf.ones((1, 1, 64)), lambda h: layer(h, reverse=True)
    else:
        equation, x_shape, kernel_shape = case
        output_shape = (None, *kernel_shape[:1], kernel_shape[2]) if len(x_shape) == 3 else (None, kernel_shape[2])
        layer = EinsumDense(equation, output_shape)
        layer.build(x_shape)
        x, call = tf.ones(x_shape), layer
    # An RMS-norm-like producer, as in the model.
    step = tf.function(lambda h: call(h * tf.math.rsqrt(tf.reduce_mean(h * h))), jit_compile=True)
    hlo = step.experimental_get_compiler_ir(x)(stage="optimized_hlo")
    entry = hlo[hlo.index("\nENTRY"):]
    assert hlo.count(" dot(") == entry.count(" dot(") == 1, hlo
