import math
import re

import keras
import numpy as np
import pytest

from keras_gemma.layers import dense
from keras_gemma.layers.dense import EinsumDense
from keras_gemma.layers.dense import _is_matmul
from keras_gemma.layers.dense import einsum
from keras_gemma.layers.dense import einsum_in_memory_order
from keras_gemma.layers.dense import kept_then_contracted
from keras_gemma.layers.dense import lay_out_kernels_for_decoding
from keras_gemma.layers.dense import one_row_product
from keras_gemma.layers.dense import one_row_product_in_place
from keras_gemma.layers.embedding import ReversibleEmbedding
from tests import helpers


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


@pytest.mark.parametrize("copies", [1, 2])
@pytest.mark.parametrize("equation, x_shape, kernel_shape", ONE_ROW_CASES)
def test_one_row_product_equals_einsum(equation, x_shape, kernel_shape, copies, monkeypatch):
    """Each backend's product of one row, as one row or two copies of it
    (`one_row_copies`: JAX on a GPU and TensorFlow take two)."""
    monkeypatch.setattr(dense, "one_row_copies", lambda: copies)
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


@pytest.mark.skipif(keras.config.backend() != "torch", reason="PyTorch's memory layouts")
@pytest.mark.parametrize("layout", ["keras", "decoding"])
@pytest.mark.parametrize("equation, x_shape, kernel_shape", ONE_ROW_CASES)
def test_torch_rows_times_a_kernel_read_it_in_place(equation, x_shape, kernel_shape, layout):
    """Several rows (a prefill) times a kernel in Keras' layout or in the
    decoding layout (`lay_out_kernels_for_decoding`): the einsum's values,
    and no copy of the kernel (`torch.einsum` copied the query and output
    kernels in Keras' layout, and the query kernel laid out for decoding,
    at every call)."""
    import torch

    x, kernel = _random((2, 5, *x_shape[2:]), 0), _random(kernel_shape, 1)
    stored = torch.as_tensor(kernel)
    if layout == "decoding":
        order = kept_then_contracted(equation)
        stored = stored.permute(order).contiguous().permute(sorted(range(len(order)), key=order.__getitem__))
        assert stored.shape == kernel.shape and not stored.is_contiguous()
    with torch.profiler.profile(record_shapes=True) as profile:
        out = einsum_in_memory_order(equation, torch.as_tensor(x), stored)
    copies = [e.input_shapes for e in profile.events() if e.name == "aten::copy_"]
    assert not [shapes for shapes in copies if math.prod(shapes[0]) >= kernel.size], copies
    np.testing.assert_allclose(out.numpy(), np.einsum(equation, x, kernel), atol=1e-5, rtol=1e-5)


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


@helpers.xla_cpu_compilation
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


# === Weight-only int8 while decoding ===

INT8_CASES = [
    ("btd,df->btf", (1, 1, 16), (16, 24)),
    *ONE_ROW_CASES,
    ("...d,vd->...v", (1, 1, 16), (50, 16)),
]


def _int8(shape, seed):
    return np.random.default_rng(seed).integers(-127, 128, shape).astype("int8")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("equation, x_shape, kernel_shape", INT8_CASES)
def test_one_row_product_in_place_equals_einsum(equation, x_shape, kernel_shape, dtype):
    """In `x`'s dtype, computed in float32 (bfloat16: one rounding)."""
    x = keras.ops.cast(_random(x_shape, 0), dtype)
    kernel = _int8(kernel_shape, 1)
    product = one_row_product_in_place(equation, x, kernel)
    assert keras.backend.standardize_dtype(product.dtype) == dtype
    expected = np.einsum(
        equation, keras.ops.convert_to_numpy(keras.ops.cast(x, "float32")), kernel.astype("float32")
    )
    tolerance = 1e-6 if dtype == "float32" else 2**-8  # bfloat16: 8 bits of mantissa.
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(keras.ops.cast(product, "float32")), expected,
        atol=1e-4, rtol=tolerance,
    )


def _weight_only_int8(layer):
    layer.quantize(
        "int8", config=keras.quantizers.Int8QuantizationConfig(activation_quantizer=None)
    )
    return layer


@pytest.mark.parametrize("case", [*INT8_CASES[:-1], "logits"])
def test_weight_only_int8_layers_on_one_row_equal_the_dequantized_product(case):
    """Each int8 layer's one-row call (JAX: `one_row_product_in_place`) equals
    the float product with its dequantized weights, soft cap included."""
    if case == "logits":
        x = _random((1, 1, 16), 0)
        layer = ReversibleEmbedding(50, 16, logit_soft_cap=3.0)
        layer.build((1, 1))
        layer.embeddings.assign(_random((50, 16), 1))
        _weight_only_int8(layer)
        table = keras.ops.convert_to_numpy(layer._embeddings).astype("float32")
        table /= keras.ops.convert_to_numpy(layer.embeddings_scale)[:, None]
        expected = np.tanh(x @ table.T / 3.0) * 3.0
        output = layer(x, reverse=True)
    else:
        equation, x_shape, kernel_shape = case
        x = _random(x_shape, 0)
        output_shape = _output_shape(x_shape, kernel_shape) if len(kernel_shape) == 3 else (None, 24)
        layer = EinsumDense(equation, output_shape)
        layer.build(x_shape)
        layer.kernel.assign(_random(kernel_shape, 1))
        _weight_only_int8(layer)
        kernel = keras.ops.convert_to_numpy(layer._kernel).astype("float32")
        kernel /= keras.ops.convert_to_numpy(layer._adjust_scale_for_dequant(layer.kernel_scale))
        expected = np.einsum(equation, x, kernel)
        output = layer(x)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(output), expected, atol=1e-5, rtol=1e-5)


@helpers.xla_cpu_compilation
@pytest.mark.skipif(keras.config.backend() != "jax", reason="the int8 decode path is JAX's")
@pytest.mark.parametrize("case", ["dense", "logits"])
def test_jax_int8_decode_loop_keeps_no_float_copy_of_the_weights(case):
    """In a compiled loop of one-row calls, as in `generate()`, XLA keeps
    no float32 copy of an int8 kernel: Keras' product let XLA hoist the
    dequantized kernel out of the loop (float32 reads at every step)."""
    import jax

    if case == "logits":
        layer = ReversibleEmbedding(4096, 64)
        layer.build((1, 1))

        def call(weights, h):
            return layer.stateless_call([], weights, h, reverse=True)[0]
    else:
        layer = EinsumDense("btd,df->btf", (None, 4096))
        layer.build((1, 1, 64))

        def call(weights, h):
            return layer.stateless_call([], weights, h)[0]

    _weight_only_int8(layer)
    weights = [v.value for v in layer.non_trainable_variables]

    def decode(weights, h):
        def step(i, h):
            return h + 1e-3 * call(weights, h)[..., :64]

        return jax.lax.fori_loop(0, 8, step, h)

    h = keras.ops.ones((1, 1, 64))
    compiled = jax.jit(decode).lower(weights, h).compile()
    float_copy = 4 * 4096 * 64
    assert compiled.memory_analysis().temp_size_in_bytes < float_copy / 2, compiled.as_text()


def _unfused_sizes(hlo):
    """`_materialized_sizes` of the instructions outside fusions: the
    buffers the compiled program writes."""
    computations = re.split(r"\n(?=\S)", hlo)
    return _materialized_sizes("\n".join(c for c in computations if not c.startswith("%fused")))


@pytest.mark.skipif(keras.config.backend() != "tensorflow", reason="TensorFlow's XLA")
@pytest.mark.parametrize("case", ["dense", "logits"])
def test_tensorflow_int8_decode_loop_writes_no_float_copy_of_the_weights(case):
    """TensorFlow's XLA, as JAX's: a compiled loop of one-row int8 calls
    writes no float32 copy of the kernel (Keras' product wrote one, read
    at every step: int8 decoded slower than float32), and it compiles in
    seconds (a slice at the opaque offset took minutes on gemma3_270m)."""
    import tensorflow as tf

    if case == "logits":
        layer = ReversibleEmbedding(4096, 64)
        layer.build((1, 1))
        call = lambda h: layer(h, reverse=True)  # noqa: E731
    else:
        layer = EinsumDense("btd,df->btf", (None, 4096))
        layer.build((1, 1, 64))
        call = layer
    _weight_only_int8(layer)

    def decode(h):
        return tf.while_loop(
            lambda i, h: i < 8, lambda i, h: (i + 1, h + 1e-3 * call(h)[..., :64]), (0, h)
        )[1]

    h = keras.ops.ones((1, 1, 64))
    compiled = tf.function(decode, jit_compile=True)
    hlo = compiled.experimental_get_compiler_ir(h)(stage="optimized_hlo")
    assert " s8[" in hlo and 4096 * 64 not in _unfused_sizes(hlo), hlo


@pytest.mark.skipif(keras.config.backend() != "torch", reason="PyTorch's Inductor")
@pytest.mark.parametrize("case", ["dense", "attention", "logits"])
def test_torch_int8_one_row_call_compiles_without_a_float_copy_of_the_weights(case):
    """Compiled by Inductor (as the decode step is), a one-row int8 call
    allocates no float32 buffer the size of its kernel: Keras' product
    dequantized the whole kernel at every call (int8 decoded 7x slower than
    float32 on the CPU config)."""
    import torch
    from torch._inductor.utils import run_and_get_code

    if case == "logits":
        layer = ReversibleEmbedding(4096, 64)
        layer.build((1, 1))
        call = lambda h: layer(h, reverse=True)  # noqa: E731
        kernel_size = 4096 * 64
    elif case == "attention":  # [heads, H, D], both leading axes contracted.
        layer = EinsumDense("btnh,nhd->btd", (None, 4096))
        layer.build((1, 1, 4, 16))
        call, kernel_size = layer, 4 * 16 * 4096
    else:
        layer = EinsumDense("btd,df->btf", (None, 4096))
        layer.build((1, 1, 64))
        call, kernel_size = layer, 64 * 4096
    _weight_only_int8(layer)
    h = keras.ops.ones((1, 1, 4, 16) if case == "attention" else (1, 1, 64))
    torch._dynamo.reset()
    output, codes = run_and_get_code(torch.compile(call), h)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(output), keras.ops.convert_to_numpy(call(h)), rtol=1e-5
    )
    buffers = re.findall(r"empty_strided_cpu\(\(([\d, ]*)\),.*?torch\.(\w+)\)", "\n".join(codes))
    sizes = [math.prod(int(d) for d in shape.split(",") if d.strip()) for shape, _ in buffers]
    assert buffers and kernel_size not in sizes, "\n".join(codes)


@pytest.mark.skipif(keras.config.backend() != "torch", reason="PyTorch's Inductor")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", ["dense", "attention", "logits"])
def test_torch_compiled_one_row_float_call_reduces_over_the_kernel_in_place(case, dtype):
    """Compiled (as the decode step is), a one-row float call is Inductor's
    own reduction over the kernel laid out by `lay_out_kernels_for_decoding`,
    no BLAS call: the matrix-vector product read gemma3_270m's float32
    weights at 12-16 GB/s, the reductions at 30-40."""
    import torch
    from torch._inductor.utils import run_and_get_code

    if case == "logits":
        layer = ReversibleEmbedding(4096, 64, dtype=dtype)
        layer.build((1, 1))
        call = lambda h: layer(h, reverse=True)  # noqa: E731
    elif case == "attention":
        layer = EinsumDense("btnh,nhd->btd", (None, 512), dtype=dtype)
        layer.build((1, 1, 4, 16))
        call = layer
    else:
        layer = EinsumDense("btd,df->btf", (None, 512), dtype=dtype)
        layer.build((1, 1, 64))
        call = layer
    randomize = np.random.default_rng(0).standard_normal
    for variable in layer.weights:
        variable.assign(randomize(variable.shape))
    lay_out_kernels_for_decoding(layer)
    h = keras.ops.cast(_random((1, 1, 4, 16) if case == "attention" else (1, 1, 64), 0), dtype)
    torch._dynamo.reset()
    output, codes = run_and_get_code(torch.compile(call, fullgraph=True), h)
    expected = keras.ops.convert_to_numpy(keras.ops.cast(call(h), "float32"))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(keras.ops.cast(output, "float32")), expected,
        rtol=1e-5 if dtype == "float32" else 2**-7,
        # bfloat16: the eager product sums the heads in bfloat16.
        atol=(1e-5 if dtype == "float32" else 2**-6) * np.abs(expected).max(),
    )
    code = "\n".join(codes)
    assert not re.search(r"extern_kernels\.\w+\(|aten\.\w*mm\b", code), code


@pytest.mark.skipif(keras.config.backend() != "torch", reason="PyTorch's Inductor")
def test_torch_one_row_product_in_place_of_a_bfloat16_row_reads_the_row_in_float32():
    """Inductor fused a 16-bit row's conversion into the product's loop,
    which then converted the int8 kernel 4-5x slower (bfloat16 + int8
    gemma3_270m decoded at 23 tok/s, float32 + int8 at 80): the row comes
    converted from an operator of its own, and the loop reading the int8
    kernel reads no bfloat16 (its result is written as bfloat16)."""
    import torch
    from torch._inductor.utils import run_and_get_code

    x = keras.ops.cast(_random((1, 1, 64), 0), "bfloat16")
    kernel = torch.as_tensor(_int8((64, 512), 1))
    product = lambda x: one_row_product_in_place("btd,df->btf", x, kernel)  # noqa: E731
    torch._dynamo.reset()
    output, codes = run_and_get_code(torch.compile(product, fullgraph=True), x)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(keras.ops.cast(output, "float32")),
        keras.ops.convert_to_numpy(keras.ops.cast(product(x), "float32")),
    )
    signatures = re.findall(r"cpp_pybinding\(\[(.*?)\]", "\n".join(codes))
    int8_loops = [s for s in signatures if "int8_t" in s]
    assert int8_loops and not any("const at::BFloat16*" in s for s in int8_loops), "\n".join(codes)


def _dot_operand_producers(hlo):
    """For each `dot` inside a fused computation: the opcodes that compute
    its first operand (the row) inside the fusion, up to a parameter."""
    producers = []
    for body in re.findall(r"\n%fused\S* \(.*?\n}", hlo, re.S):
        instructions = {}
        for line in body.splitlines()[1:]:
            match = re.match(r"\s*(?:ROOT )?%(\S+) = \S+ ([\w-]+)\((.*?)\)", line)
            if match:
                operands = re.findall(r"%([\w.-]+)", match.group(3))
                instructions[match.group(1)] = (match.group(2), operands)
        for opcode, operands in instructions.values():
            if opcode == "dot":
                chain, name = [], operands[0]
                while name in instructions and instructions[name][0] != "parameter":
                    chain.append(instructions[name][0])
                    name = instructions[name][1][0]
                producers.append(chain)
    return producers


@helpers.xla_cpu_compilation
@pytest.mark.skipif(keras.config.backend() != "jax", reason="the int8 decode path is JAX's")
@pytest.mark.parametrize("case", [*INT8_CASES[:-1], "logits"])
def test_jax_one_row_product_in_place_reads_a_finished_row(case):
    """The int8 product's loop reads its row from a buffer: XLA fused the
    norm before it (or the attention output's transposition) into the
    product, recomputing it for every kernel row (7x slower for the
    attention output on gemma3_270m)."""
    if case == "logits":
        layer, x_shape = ReversibleEmbedding(300, 64), (1, 1, 64)
        layer.build((1, 1))

        def product(weights, h):
            return layer.stateless_call([], weights, h, reverse=True)[0]
    else:
        equation, x_shape, kernel_shape = case
        output_shape = _output_shape(x_shape, kernel_shape) if len(kernel_shape) == 3 else (None, 24)
        layer = EinsumDense(equation, output_shape)
        layer.build(x_shape)

        def product(weights, h):
            return layer.stateless_call([], weights, h)[0]

    _weight_only_int8(layer)
    weights = [v.value for v in layer.non_trainable_variables]

    def step(weights, h):  # An RMS-norm-like producer, as in the model.
        return product(weights, h * keras.ops.rsqrt(keras.ops.mean(h * h)))

    hlo = _optimized_hlo(step, weights, keras.ops.ones(x_shape))
    producers = _dot_operand_producers(hlo)
    assert producers, hlo  # The int8 product is fused (with its dequantization).
    for chain in producers:
        assert set(chain) <= {"bitcast", "reshape"}, (chain, hlo)


@pytest.mark.parametrize("position", [0, 5])
def test_one_row_product_in_place_of_a_nan_row_is_nan(position):
    """NaN in, NaN out, wherever it is (a NaN first element takes the
    other branch of the product's opaque offset)."""
    x = _random((1, 1, 16), 0)
    x[0, 0, position] = np.nan
    product = one_row_product_in_place("btd,fd->btf", x, _int8((24, 16), 1))
    assert np.isnan(keras.ops.convert_to_numpy(product)).all()


# === bfloat16 products with a float32 result (JAX on CPU) ===

# Every two-operand product in the model: feed-forward, query, output,
# attention scores and values, vocabulary logits (with `...`).
HALF_PRECISION_CASES = [
    ("btd,df->btf", (2, 5, 16), (16, 24)),
    ("btd,ndh->btnh", (2, 5, 16), (4, 16, 8)),
    ("btnh,nhd->btd", (2, 5, 4, 8), (4, 8, 16)),
    ("btkgh,bskh->bkgts", (2, 5, 1, 4, 8), (2, 5, 1, 8)),
    ("bkgts,bskh->btkgh", (2, 1, 4, 5, 5), (2, 5, 1, 8)),
    ("...d,vd->...v", (2, 5, 16), (40, 16)),
]


def _bfloat16(shape, seed):
    """bfloat16 values as float32 numpy (exactly representable in both)."""
    x = keras.ops.cast(keras.ops.cast(_random(shape, seed), "bfloat16"), "float32")
    return keras.ops.convert_to_numpy(x)


@pytest.mark.parametrize("equation, a_shape, b_shape", HALF_PRECISION_CASES)
def test_bfloat16_einsum_equals_float32_product_rounded(equation, a_shape, b_shape):
    """The product is the float32 product of the bfloat16 operands, rounded
    once to bfloat16: within bfloat16's half-ulp (2^-9 relative; one ulp
    allowed). TensorFlow keeps its own kernel (see `einsum`), which rounds
    partial sums to bfloat16 on CPUs without AVX-512 (measured up to 0.7%
    off on an AVX2 AMD EPYC, where the AVX-512 machines gave one rounding):
    four ulps there."""
    a, b = _bfloat16(a_shape, 0), _bfloat16(b_shape, 1)
    result = einsum(equation, keras.ops.cast(a, "bfloat16"), keras.ops.cast(b, "bfloat16"))
    assert keras.backend.standardize_dtype(result.dtype) == "bfloat16"
    exact = np.einsum(equation, a.astype("float64"), b.astype("float64"))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(keras.ops.cast(result, "float32")), exact,
        rtol=2**-6 if keras.config.backend() == "tensorflow" else 2**-8, atol=1e-6,
    )


@pytest.mark.skipif(keras.config.backend() != "jax", reason="the float32-result path is JAX's")
@pytest.mark.parametrize("equation, a_shape, b_shape", HALF_PRECISION_CASES)
def test_jax_bfloat16_einsum_accumulates_in_float32_both_ways(equation, a_shape, b_shape):
    """Forward and backward products take bfloat16 operands and give a
    float32 result (XLA's fast CPU kernels), and the gradients are those of
    the float32 product of the same operands."""
    import jax
    import jax.numpy as jnp

    a, b = _bfloat16(a_shape, 0), _bfloat16(b_shape, 1)
    target = _random(np.einsum(equation, a, b).shape, 2)

    def loss(a, b, product):
        return jnp.sum(product(a, b).astype(jnp.float32) * target)

    ours = jax.value_and_grad(lambda a, b: loss(a, b, lambda a, b: einsum(equation, a, b)), (0, 1))
    half = (jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16))
    products = [
        line for line in jax.jit(ours).lower(*half).as_text().splitlines() if "dot_general" in line
    ]
    assert len(products) == 3, products  # forward, gradient of a, gradient of b
    for line in products:
        assert re.search(r"\(tensor<[^>]*bf16>, tensor<[^>]*bf16>\) -> tensor<[^>]*f32>", line), line

    reference = jax.grad(lambda a, b: loss(a, b, lambda a, b: jnp.einsum(equation, a, b)), (0, 1))
    for grad, exact in zip(ours(*half)[1], reference(jnp.asarray(a), jnp.asarray(b))):
        assert grad.dtype == jnp.bfloat16
        # The incoming gradient is rounded to bfloat16 too (the product's
        # dtype): errors of ~2^-8 of the largest terms, which can cancel.
        np.testing.assert_allclose(
            np.asarray(grad, "float32"), exact, rtol=0, atol=2**-7 * np.abs(exact).max()
        )


@pytest.mark.skipif(keras.config.backend() != "jax", reason="the float32-result path is JAX's")
@pytest.mark.parametrize("dtype", ["bfloat16", "mixed_bfloat16"])
def test_jax_bfloat16_model_multiplies_with_float32_results(dtype):
    """In the whole model (variables autocast in mixed precision, too) every
    product takes bfloat16 operands and gives a float32 result."""
    import jax

    from keras_gemma.models.gemma_backbone import GemmaBackbone

    backbone = GemmaBackbone(vocabulary_size=64, dtype=dtype, **helpers.TINY_MQA)
    inputs = {"token_ids": np.ones((2, 6), "int32"), "padding_mask": np.ones((2, 6), "int32")}

    def logits(trainable, non_trainable):
        hidden, _ = backbone.stateless_call(trainable, non_trainable, inputs)
        return backbone.token_logits(hidden)

    variables = ([v.value for v in backbone.trainable_variables],
                 [v.value for v in backbone.non_trainable_variables])
    products = [line for line in jax.jit(logits).lower(*variables).as_text().splitlines()
                if "dot_general" in line]
    # 2 layers x (query, key, value, scores, values, output, 3 feed-forward), logits.
    assert len(products) == 2 * 9 + 1, products
    for line in products:
        assert re.search(r"\(tensor<[^>]*bf16>, tensor<[^>]*bf16>\) -> tensor<[^>]*f32>", line), line


@pytest.mark.parametrize("weight_only", [True, False])
def test_int8_embedding_quantizes_block_by_block_to_keras_values(weight_only, monkeypatch):
    """The table is quantized in blocks of rows: the same int8 values and
    scales as Keras' own layer, the caller's config kept for saving, and
    NumPy temporaries far smaller than the table (Keras' whole-table pass
    holds several float copies: +1.5 GB peak for gemma3_270m)."""
    import tracemalloc

    from keras_gemma.layers.embedding import RowBlockAbsMaxQuantizer

    monkeypatch.setattr(RowBlockAbsMaxQuantizer, "rows_per_block", 512)
    table = _random((8000, 96), 1) * 3.0
    ours, theirs = ReversibleEmbedding(8000, 96), keras.layers.ReversibleEmbedding(8000, 96)
    for layer in (ours, theirs):
        layer.build((1, 1))
        layer.embeddings.assign(table)
    config = lambda: (  # noqa: E731
        keras.quantizers.Int8QuantizationConfig(activation_quantizer=None) if weight_only else None
    )
    peaks = []
    for layer in (ours, theirs):
        tracemalloc.start()
        layer.quantize("int8", config=config())
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    for mine, reference in [(ours._embeddings, theirs._embeddings),
                            (ours.embeddings_scale, theirs.embeddings_scale)]:
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(mine), keras.ops.convert_to_numpy(reference))
    # Ours: the int8 values (a quarter of the table, and their copy as a
    # tensor) and one block's floats; Keras': several float tables.
    assert peaks[0] < table.nbytes < 2 * table.nbytes < peaks[1], peaks
    saved = ours.get_config()["quantization_config"]
    assert saved == theirs.get_config()["quantization_config"]
    assert "RowBlock" not in str(saved)
