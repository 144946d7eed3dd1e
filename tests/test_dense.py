import math
import re

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
# rewrites (query, multi-query key/value, attention output).
ONE_ROW_CASES = [
    ("btd,ndh->btnh", (1, 1, 16), (4, 16, 8)),
    ("bsd,kdh->bskh", (1, 1, 16), (1, 16, 8)),
    ("btnh,nhd->btd", (1, 1, 4, 8), (4, 8, 16)),
]


def _output_shape(x_shape, kernel_shape):
    """EinsumDense's `output_shape` for a case: `(None, heads, H)` for a
    `[heads, D, H]` kernel, `(None, D)` for the `[heads, H, D]` one."""
    if len(x_shape) == 3:
        return (None, kernel_shape[0], kernel_shape[2])
    return (None, kernel_shape[2])


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
    """The layer on one row (it takes `one_row_product`) equals Keras'
    layer on the same weights, LoRA adapters included."""
    x = _random(x_shape, 0)
    output_shape = _output_shape(x_shape, kernel_shape)
    ours = EinsumDense(equation, output_shape)
    reference = keras.layers.EinsumDense(equation, output_shape)
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


def _optimized_hlo(function, *args):
    """The HLO that XLA runs for `function(*args)` (JAX or TensorFlow)."""
    if keras.config.backend() == "jax":
        import jax

        return jax.jit(function).lower(*args).compile().as_text()
    import tensorflow as tf

    compiled = tf.function(function, jit_compile=True)
    return compiled.experimental_get_compiler_ir(*args)(stage="optimized_hlo")


def _materialized_sizes(hlo):
    """Element counts of the f32 tensors that HLO instructions write (not
    parameters, bitcasts or tuple accesses, which alias their input)."""
    sizes = []
    for line in hlo.splitlines():
        match = re.match(r"\s*(?:ROOT )?%\S+ = f32\[([\d,]*)\]\S* (\S+)\(", line)
        if match and match.group(2) not in ("parameter", "bitcast", "get-tuple-element"):
            sizes.append(math.prod(int(d) for d in match.group(1).split(",") if d))
    return sizes


@pytest.mark.skipif(keras.config.backend() == "torch", reason="XLA's compilation")
@pytest.mark.parametrize("case", [*ONE_ROW_CASES, "logits"])
def test_xla_one_row_products_read_the_kernel_in_place(case):
    """Compiled with XLA, a one-row product neither copies nor transposes
    the kernel (JAX's XLA transposed attention kernels at every decoding
    step), and on TensorFlow it stays a standalone `dot` (a BLAS call)
    rather than a dot fused into a naive loop with the norm before it."""
    # The layers themselves, so their choice of path is checked too, with
    # the kernel as an argument: a parameter of the XLA computation.
    if case == "logits":
        kernel, x = keras.ops.ones((300, 64)), keras.ops.ones((1, 1, 64))
        layer = ReversibleEmbedding(300, 64)
        layer.build((1, 1))

        def product(h, table):
            return layer.stateless_call([table], [], h, reverse=True)[0]
    else:
        equation, x_shape, kernel_shape = case
        x, kernel = keras.ops.ones(x_shape), keras.ops.ones(kernel_shape)
        layer = EinsumDense(equation, _output_shape(x_shape, kernel_shape))
        layer.build(x_shape)

        def product(h, kernel):
            return layer.stateless_call([kernel], [], h)[0]

    # An RMS-norm-like producer, as in the model.
    def step(h, kernel):
        return product(h * keras.ops.rsqrt(keras.ops.mean(h * h)), kernel)

    hlo = _optimized_hlo(step, x, kernel)
    kernel_size = math.prod(kernel.shape)
    assert kernel_size not in _materialized_sizes(hlo), hlo
    if keras.config.backend() == "tensorflow":
        entry = hlo[hlo.index("\nENTRY"):]
        assert hlo.count(" dot(") == entry.count(" dot(") == 1, hlo
