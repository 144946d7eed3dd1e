import contextlib
import contextvars
import math

import keras
from keras import ops

from keras_gemma.devices import computes_on_gpu
from keras_gemma.layers.direct_call import DirectCall
from keras_gemma.layers.direct_call import dynamo_is_tracing


@keras.saving.register_keras_serializable(package="keras_gemma")
class EinsumDense(DirectCall, keras.layers.EinsumDense):
    """Keras' `EinsumDense`, with the same weights, LoRA and quantization,
    computing the product the way each backend's compiler runs fastest.

    - A plain matrix product (`"btd,df->btf"`: the feed-forward layers) is
      `x @ kernel`. For PyTorch: `torch.einsum` always becomes a batched
      matmul, and Inductor lowers a batched matmul with one row (every
      projection while decoding one token) to its own multiply-and-sum
      loops on CPU, 2-3x slower than the BLAS matrix-vector product that
      `matmul` keeps. On JAX and TensorFlow both forms compile to the same
      dot.
    - One row (decoding one token, batch 1): see `one_row_product`.
    - bfloat16 on XLA's CPU backend: see `einsum`.

    It keeps Keras' class name on purpose: weight files locate a layer's
    variables by its class name, so KerasHub files load unchanged.
    """

    call_uses_training = False

    def quantize(self, mode=None, type_check=True, config=None):
        # Keras quantizes only layers whose type is exactly its own.
        super().quantize(mode, type_check=False, config=config)

    def quantized_build(self, kernel_shape, mode, config=None):
        config = config_or_weight_only(mode, config, self.path)
        super().quantized_build(kernel_shape, mode, config)
        self.quantization_config = self.quantization_config or config

    def save_own_variables(self, store):
        """Keras' layout, where Keras folds LoRA adapters into the kernel and
        saves no adapters (a weights file or `.keras` file reloaded with
        LoRA then had zero adapters: no gradient, nothing learned). With
        LoRA enabled, outside `adapters_merged_on_save()`, the base kernel
        is saved and the two adapters after it: the file restores the
        training state."""
        if not self.lora_enabled or merges_adapters_on_save():
            return super().save_own_variables(store)
        values = {}
        self.lora_enabled = False  # Keras then saves the kernel as it is.
        try:
            super().save_own_variables(values)
        finally:
            self.lora_enabled = True
        values[str(len(values))] = self.lora_kernel_a
        values[str(len(values))] = self.lora_kernel_b
        for key, value in values.items():
            store[key] = value

    def load_own_variables(self, store):
        """Keras' loading, plus the adapters `save_own_variables` writes."""
        saved = len(store.keys())
        own = len(self.weights) - (2 if self.lora_enabled else 0)
        if not self.lora_enabled and saved == own + 2:
            rank = store[str(saved - 2)].shape[-1]
            raise ValueError(
                f"The saved weights of {self.path!r} include LoRA adapters (rank "
                f"{rank}). Enable LoRA on this model as it was when saved, e.g. "
                f"`backbone.enable_lora(rank={rank}, ...)`, before loading them; "
                "or save from a model after `merge_lora()`."
            )
        super().load_own_variables(store)  # Sets both adapters to zero.
        if not self.lora_enabled:
            return
        if saved == own + 2:
            self.lora_kernel_a.assign(store[str(saved - 2)])
            self.lora_kernel_b.assign(store[str(saved - 1)])
        else:
            # Saved with the adapters folded in (Keras, presets): new
            # adapters as `enable_lora` makes them (B = 0) keep its outputs
            # and, unlike two zero matrices, can learn.
            initializer = keras.initializers.get(LORA_A_INITIALIZER)
            self.lora_kernel_a.assign(initializer(self.lora_kernel_a.shape, self.lora_kernel_a.dtype))

    def _adjust_scale_for_dequant(self, scale):
        """Keras' own, reading its axis lists as tuples: Dynamo cannot pass
        Keras' tracked lists to a torch op inside a nested compile region
        (`call_block_traced_once`)."""
        squeeze, expand, transpose = (
            tuple(getattr(self, f"_kernel_{kind}_axes")) for kind in ("squeeze", "expand", "transpose")
        )
        if squeeze:
            scale = ops.expand_dims(scale, axis=squeeze)
        if expand:
            scale = ops.squeeze(scale, axis=expand)
        if transpose:  # Undo the transposition.
            scale = ops.transpose(scale, sorted(range(len(transpose)), key=transpose.__getitem__))
        return scale

    def _int8_call(self, inputs, training=None):
        if decodes_int8_in_place(self, is_one_row(inputs, _free_axes(self.equation))):
            x = one_row_product_in_place(self.equation, inputs, self._kernel)
            x = ops.divide(x, self.kernel_scale)
        elif self.inputs_quantizer is None and keras.config.backend() == "torch":
            # Keras' weight-only PyTorch branch rebinds the kernel scale that
            # its custom gradient's closure reads, which then rescales it a
            # second time: the backward pass fails for 3-D kernels (LoRA on
            # int8 attention). The same product, differentiated by torch:
            scale = self._adjust_scale_for_dequant(self.kernel_scale)
            kernel = ops.divide(ops.cast(self._kernel, self.compute_dtype), scale)
            x = einsum_in_memory_order(self.equation, inputs, kernel)
            if self.lora_enabled:
                # torch.einsum does not promote: a bfloat16 model's inputs
                # meet its float32 adapters in float32, as on JAX.
                lora_a = ops.convert_to_tensor(self.lora_kernel_a)  # Autocast, if any.
                dtype = keras.backend.result_type(inputs.dtype, lora_a.dtype)
                lora_x = ops.einsum(self.equation, ops.cast(inputs, dtype), ops.cast(lora_a, dtype))
                lora_x = ops.matmul(lora_x, self.lora_kernel_b)
                x = ops.add(x, (self.lora_alpha / self.lora_rank) * lora_x)
                x = ops.cast(x, self.compute_dtype)
        else:
            with _adapters_read_as(inputs, self):
                return super()._int8_call(inputs, training=training)
        if self.bias is not None:
            x = ops.add(x, self.bias)
        if self.activation is not None:
            x = self.activation(x)
        return x

    def _int4_call(self, inputs, training=None):
        with _adapters_read_as(inputs, self):
            return super()._int4_call(inputs, training=training)

    def call(self, inputs, training=None):
        kernel = self.kernel  # With LoRA: the kernel plus the adapters' product.
        one_row = is_one_row(inputs, _free_axes(self.equation))
        if one_row and not self.lora_enabled and torch_decodes_in_place():
            x = one_row_product_in_place(self.equation, inputs, kernel)
        elif one_row:
            if _is_matmul(self.equation):
                x = ops.matmul(inputs, kernel)
            else:
                x = one_row_product(self.equation, inputs, kernel)
        elif _is_matmul(self.equation) and not _accumulates_in_float32(inputs, kernel):
            x = ops.matmul(inputs, kernel)
        else:
            x = einsum(self.equation, inputs, kernel)
        if self.bias is not None:
            x = ops.add(x, self.bias)
        if self.activation is not None:
            x = self.activation(x)
        return x


def _adapters_read_as(inputs, layer):
    """On PyTorch, a scope in which `layer`'s float32 LoRA adapters read in
    the dtype of a 16-bit model's `inputs`, as under mixed precision: Keras'
    quantized calls multiply the two with `torch.einsum`, which does not
    promote ("expected scalar type Float but found BFloat16")."""
    if keras.config.backend() != "torch" or not layer.lora_enabled:
        return contextlib.nullcontext()
    dtype = keras.backend.standardize_dtype(inputs.dtype)
    if dtype == keras.backend.standardize_dtype(layer.lora_kernel_a.dtype):
        return contextlib.nullcontext()
    from keras.src.backend.common.variables import AutocastScope

    return AutocastScope(dtype)


_KERAS_DEFAULT_INT8 = contextvars.ContextVar("keras_default_int8", default=False)


@contextlib.contextmanager
def keras_default_int8():
    """Layers built in this block from an int8 dtype policy alone quantize
    their activations too, as Keras' default int8 does: KerasHub's int8
    presets were quantized that way (weight-only int8 was 0.02 off their
    logits, 60% of the quantization error)."""
    token = _KERAS_DEFAULT_INT8.set(True)
    try:
        yield
    finally:
        _KERAS_DEFAULT_INT8.reset(token)


_SAVED_CONFIGS = contextvars.ContextVar("saved_quantization_configs", default=None)


@contextlib.contextmanager
def saved_quantization_configs(configs):
    """Layers built in this block from a quantized dtype policy take their
    config from `configs` (`{layer path: serialized config}`, what
    `GemmaBackbone.get_config` records for configs other than the default
    one: activations quantized too, another int4 block size)."""
    token = _SAVED_CONFIGS.set(configs)
    try:
        yield
    finally:
        _SAVED_CONFIGS.reset(token)


def recorded_config(layer):
    """The serialized quantization config that a quantized layer's dtype
    policy alone would not rebuild, or None."""
    if rebuilds_from_its_dtype_policy(layer) or layer.quantization_mode not in ("int8", "int4"):
        return None
    config = layer.quantization_config
    if config is None:  # Built from a KerasHub preset's policy (`keras_default_int8`).
        config = keras.quantizers.Int8QuantizationConfig()
    return keras.saving.serialize_keras_object(config)


def config_or_weight_only(mode, config, path=None):
    """`config`; without one, the one recorded for the layer at `path` (see
    `saved_quantization_configs`), else the config `quantize(mode)` uses:
    for int8 weight-only (see `weight_only_int8_by_default`), for int4
    Keras' default.

    A layer built from a saved quantized dtype policy (a quantized preset)
    gets no config, and Keras' int8 default would quantize its activations
    too, its int4 one would store per-channel scales instead of blocks.
    (Except inside `keras_default_int8()`: a KerasHub preset.)
    """
    saved = (_SAVED_CONFIGS.get() or {}).get(path)
    if config is None and saved is not None:
        return keras.saving.deserialize_keras_object(saved)
    if config is None and mode == "int8" and _KERAS_DEFAULT_INT8.get():
        return keras.quantizers.Int8QuantizationConfig()
    if config is None and mode == "int8":
        return keras.quantizers.Int8QuantizationConfig(activation_quantizer=None)
    if config is None and mode == "int4":
        return keras.quantizers.Int4QuantizationConfig()
    return config


# Keras' `enable_lora` default for the first adapter (the second is zero).
LORA_A_INITIALIZER = "he_uniform"

_MERGES_ADAPTERS = contextvars.ContextVar("merges_lora_adapters_on_save", default=False)


@contextlib.contextmanager
def adapters_merged_on_save():
    """Inside: layers with LoRA save their kernels with the adapters folded
    in and no adapters, as Keras does: presets, which KerasHub and models
    without LoRA load. Elsewhere (`.keras` files, `save_weights`) they save
    the base kernel and the adapters apart (`EinsumDense.save_own_variables`)."""
    token = _MERGES_ADAPTERS.set(True)
    try:
        yield
    finally:
        _MERGES_ADAPTERS.reset(token)


def merges_adapters_on_save():
    return _MERGES_ADAPTERS.get()


# Where LoRA keeps the tied embedding's input quantizer while it is
# enabled (`lora.hold_embedding_inputs_quantizer`): still the layer's own.
HELD_INPUTS_QUANTIZER = "_inputs_quantizer_held_for_lora"


def rebuilds_from_its_dtype_policy(layer):
    """Whether a quantized layer built again from its dtype policy alone
    (no config, as a preset stores it) has its variables and computation."""
    if layer.quantization_mode not in ("int8", "int4"):
        return False
    if layer.inputs_quantizer is not None or hasattr(layer, HELD_INPUTS_QUANTIZER):
        return False
    default = config_or_weight_only(layer.quantization_mode, None)
    # No config: the layer was itself built from its policy (a preset).
    config = layer.quantization_config or default
    return getattr(config, "block_size", None) == getattr(default, "block_size", None)


def is_one_row(x, free_axes):
    """Whether the product multiplies one row of `x`: the product of its
    `free_axes` (the axes that are not contracted) is statically 1, as when
    decoding one token with batch 1."""
    sizes = [x.shape[axis] for axis in free_axes]
    return None not in sizes and math.prod(sizes) == 1


def one_row_product(equation, x, kernel):
    """`einsum(equation, x, kernel)` for a one-row `x`, written so that the
    compiled decode step reads each kernel once, in place, with a BLAS call.

    - Attention kernels are multiplied head by head (a batched product):
      `[heads, D, H]` (query, key, value) and `[heads, H, D]` (output, then
      summed over heads). As one matrix product JAX's XLA transposes them
      to `[D, heads * H]` / `[heads * H, D]` at every decoding step, and
      PyTorch's einsum copies the transposed kernel too (~1.5x slower
      decoding on the CPU config).
    - Where `one_row_copies()` says so, `x` is doubled to two rows and the
      first row of the result kept (below).
    """
    x_axes, kernel_axes = equation.split("->")[0].split(",")
    copies = one_row_copies()
    heads_first = len(kernel_axes) == 3 and kernel_axes[0] not in x_axes
    if heads_first and kernel_axes[1] == x_axes[-1]:  # [heads, D, H]
        heads, depth, head_dim = kernel.shape
        rows = ops.broadcast_to(ops.reshape(x, (1, 1, depth)), (heads, copies, depth))
        out = ops.matmul(rows, kernel)[:, :1]  # [heads, 1, H]
        return ops.reshape(ops.transpose(out, (1, 0, 2)), (*x.shape[:-1], heads, head_dim))
    if len(kernel_axes) == 3 and x_axes[-2:] == kernel_axes[:2]:  # [heads, H, D]
        heads, head_dim, depth = kernel.shape
        rows = ops.broadcast_to(ops.reshape(x, (heads, 1, head_dim)), (heads, copies, head_dim))
        out = ops.sum(ops.matmul(rows, kernel), axis=0)[:1]
        return ops.reshape(out, (*x.shape[:-2], depth))
    rows = ops.concatenate([x] * copies, axis=0)
    return ops.einsum(equation, rows, kernel)[:1]


def one_row_copies():
    """How many copies of a one-row `x` `one_row_product` multiplies: 2
    where XLA compiles a product of one row badly, else 1.

    - TensorFlow's XLA on CPU fuses a one-row product whose kernel operand
      is a reshape into a naive single-threaded loop (with the norm before
      it), 3-10x slower than the BLAS call it makes for two rows.
    - JAX's XLA on a GPU rewrites a product of one row with a matrix of
      under 10M values (every attention kernel of Gemma 2B) into a multiply
      and a column reduction: the query's `[8, 2048, 256]` product is
      written out whole and read back (12.3 us per layer on an H200, 0.65
      TB/s), the key's and value's 1 MB took 4 us each. Two rows are a
      matrix product (GEMM kernels; XLA also merges key and value into
      one): Gemma 2B bfloat16 decoding 490.7 -> 581.1 tok/s on an H200,
      measured side by side (`benchmarks/gpu/profile_decode.py`,
      2026-12-04)."""
    backend = keras.config.backend()
    return 2 if backend == "tensorflow" or (backend == "jax" and computes_on_gpu()) else 1


def decodes_int8_in_place(layer, one_row):
    """Whether the int8 `layer` multiplies its one-row input with
    `one_row_product_in_place`: on CPU, where it was measured, weight-only (no
    activation quantizer), without LoRA."""
    if not one_row or layer.inputs_quantizer is not None or layer.lora_enabled:
        return False
    return keras.config.backend() in ("jax", "tensorflow", "torch") and not computes_on_gpu()


def torch_decodes_in_place():
    """Whether a one-row float product on PyTorch takes
    `one_row_product_in_place`: on CPU,
    while `torch.compile` traces the decode step. Inductor's reduction
    loops over a kernel laid out by `lay_out_kernels_for_decoding` read
    float32 at ~30-40 GB/s where the BLAS matrix-vector product of one row
    reads ~12-16 GB/s (gemma3_270m's 671 MB table: 16-19 vs 47-58 ms).
    Eager, the product would materialize `row * kernel`."""
    return dynamo_is_tracing() and not computes_on_gpu()


def one_row_product_in_place(equation, x, kernel):
    """`einsum(equation, x, kernel)` for a one-row float `x` and an int8
    `kernel` (the int8 values, unscaled; on PyTorch also a float kernel,
    see `torch_decodes_in_place`), in `x`'s dtype (computed in float32),
    written so that the compiled decode step reads the kernel in place and
    nothing bigger. Each kernel axis is either contracted with `x` or kept
    in the output (no batched kernels).

    PyTorch: `sum(x * float(kernel))` over the contracted axes, which
    Inductor compiles into one loop that converts the kernel as it reads
    it, in its memory layout (contracted axes innermost on CPU, see
    `lay_out_kernels_for_decoding`). (Keras' int8 product dequantizes the whole
    kernel into a float32 buffer at every call, and a matmul of the
    converted kernel compiles no better: int8 decoded 7x slower than
    float32 on the CPU config. `_weight_int8pack_mm`, torch's int8 kernel,
    is fast only with bfloat16 activations.)

    Left to itself, XLA hoists `convert(kernel)` out of the decode loop (it
    is loop-invariant): every step then reads a float32 copy of every
    kernel, which is float32 speed at int8 + float32 memory. Here the
    kernel is re-laid out `[out, in]` and padded by one row (loop-invariant,
    hoisted: an int8 copy), and each step takes its rows from an offset
    that XLA cannot prove constant (0, or 1 if `x` starts with NaN, when the
    result is NaN anyway); the row gather, the dequantization and the
    product then fuse into one loop that reads int8. (`x @ convert(w).T`
    is the form XLA fuses; a `dot_general` contracting both last axes
    converts into a buffer.)

    `x` comes out of a conditional (on the same NaN test), which XLA cannot
    fuse into the product: fused, whatever computes `x` (the norm before
    it, the attention output's transposition) is recomputed for every
    kernel row; the attention output's product then ran at ~1 GB/s, 7x
    slower (gemma3_270m decode: 43 -> 28 ms per token).
    """
    x_axes, kernel_axes, out_axes = _split(_expand_ellipsis(equation, x.ndim))
    contracted = [c for c in kernel_axes if c in x_axes and c not in out_axes]
    kept = [c for c in kernel_axes if c not in contracted]
    x_kept = [c for c in x_axes if c not in contracted]  # Each of size 1.
    size = dict(zip(kernel_axes, kernel.shape))
    # x's contracted axes in the kernel's order, then its kept ones.
    row = ops.transpose(x, [x_axes.index(c) for c in contracted + x_kept])
    if keras.config.backend() == "torch":
        row = _torch_float32_row(row, kernel)
        row = ops.reshape(row, [size[c] if c in contracted else 1 for c in kernel_axes])
        out = ops.multiply(row, ops.cast(kernel, "float32"))
        out = ops.sum(out, axis=[kernel_axes.index(c) for c in contracted])
    else:
        row = ops.cast(row, "float32")
        out = _xla_int8_one_row_product(row, kernel, kept_then_contracted(equation))
    # -> the output's axes: x's kept axes (size 1), then `kept`.
    out = ops.reshape(out, [1] * len(x_kept) + [size[c] for c in kept])
    out = ops.transpose(out, [(x_kept + kept).index(c) for c in out_axes])
    return ops.cast(out, x.dtype)


def einsum_in_memory_order(equation, x, kernel):
    """`ops.einsum(equation, x, kernel)`, on PyTorch as matrix products that
    read the kernel where it lies, when `x`'s trailing axes are contracted
    with axes that are adjacent in the kernel's memory. `torch.einsum`
    orders the axes its own way and copied the kernel into that order at
    every call: the query and output kernels in Keras' layout (gemma3_270m's
    eager 32-token prefill: 36 copies of 2.6 MB, 191 -> 184 ms without), and
    any kernel laid out for decoding (`lay_out_kernels_for_decoding`: 161 ->
    128 ms without).
    A kernel stored `[kept, contracted]` (the decoding layout) is one
    product with its transposed view, `[contracted, kept]` one with the
    kernel itself, and `[heads, contracted, kept]` (the query's in Keras'
    layout) one per head."""
    if keras.config.backend() != "torch":
        return ops.einsum(equation, x, kernel)
    kernel = ops.convert_to_tensor(kernel)  # Not a Keras variable.
    x_axes, kernel_axes, out_axes = _split(equation)
    order = sorted(range(kernel.ndim), key=lambda i: -kernel.stride(i))
    stored_axes = "".join(kernel_axes[i] for i in order)
    stored = kernel.permute(order)
    contracted = "".join(c for c in stored_axes if c not in out_axes)
    start = stored_axes.find(contracted)
    before, after = stored_axes[:start], stored_axes[start + len(contracted):]
    x_kept = x_axes[: len(x_axes) - len(contracted)]
    if not (
        contracted and start >= 0 and stored.is_contiguous()
        and x_axes.endswith(contracted) and out_axes == x_kept + before + after
    ):
        return ops.einsum(f"{x_axes},{stored_axes}->{out_axes}", x, stored)
    size = math.prod(stored.shape[start : start + len(contracted)])
    rows = ops.reshape(x, (-1, size))
    kept_before = math.prod(stored.shape[:start])
    kept_after = math.prod(stored.shape[start + len(contracted):])
    if not after:  # [kept, contracted]
        out = ops.matmul(rows, ops.transpose(ops.reshape(stored, (kept_before, size))))
    elif not before:  # [contracted, kept]
        out = ops.matmul(rows, ops.reshape(stored, (size, kept_after)))
    else:  # [heads, contracted, kept]: [heads, rows, kept], then rows first.
        out = ops.matmul(rows, ops.reshape(stored, (kept_before, size, kept_after)))
        out = ops.transpose(out, (1, 0, 2))
    kept_shape = [stored.shape[i] for i, c in enumerate(stored_axes) if c not in contracted]
    return ops.reshape(out, (*x.shape[: len(x_kept)], *kept_shape))


def lay_out_kernels_for_decoding(layer):
    """On a PyTorch CPU, store the kernel of every float or weight-only int8
    `EinsumDense` in `layer` with its contracted axes innermost in memory
    (a permuted view of the same shape), for `one_row_product_in_place`.
    Inductor then compiles each one-row product into reductions along
    contiguous values, about 2x faster than over Keras' `[in, out]` layout
    (gemma3_270m's 18 int8 layers: 10 -> 5 ms per token; its int8 decoding
    55 -> 84 tok/s). Keras assigns variables in place (`copy_`), which
    keeps the layout, and every other use of a kernel reads it through its
    strides (`einsum_in_memory_order`). Done before the decode step
    compiles: its graph is specialized to the strides."""
    if computes_on_gpu():
        return
    for sublayer in layer._flatten_layers():
        if not isinstance(sublayer, EinsumDense):
            continue
        int8 = sublayer.quantization_mode == "int8" and decodes_int8_in_place(sublayer, one_row=True)
        if not (int8 or sublayer.quantization_mode is None):
            continue
        order = kept_then_contracted(sublayer.equation)
        value = sublayer._kernel.value
        stored = value.detach().permute(order).contiguous()
        value.data = stored.permute([order.index(i) for i in range(len(order))])


def kept_then_contracted(equation):
    """The kernel's axes (positions) that the output keeps, then those that
    the product contracts, each in the kernel's order: the `[out, in]`
    order that `one_row_product_in_place` reads kernels in."""
    _, kernel_axes, out_axes = _split(equation)
    kept = [i for i, c in enumerate(kernel_axes) if c in out_axes]
    return kept + [i for i, c in enumerate(kernel_axes) if c not in out_axes]


def _torch_float32_row(row, kernel):
    """`row` in float32 for `one_row_product_in_place` on PyTorch. A 16-bit row
    times an int8 kernel is converted by an operator Inductor cannot fuse
    into the product: fused, the product's loop reads 32 values per step
    instead of 16 and converts the int8 kernel 4-5x slower (gemma3_270m's
    table: 19 vs 4 ms). (A 16-bit kernel's loop reads 32 anyway.)"""
    import torch

    if row.dtype == torch.float32 or keras.backend.standardize_dtype(kernel.dtype) != "int8":
        return ops.cast(row, "float32")
    return torch.ops.keras_gemma.float32_copy(row)


def _register_torch_float32_copy():
    import torch

    @torch.library.custom_op("keras_gemma::float32_copy", mutates_args=())
    def float32_copy(x: torch.Tensor) -> torch.Tensor:
        return x.float()

    @float32_copy.register_fake
    def _(x):
        return torch.empty_like(x, dtype=torch.float32)

    def setup_context(ctx, inputs, output):
        ctx.dtype = inputs[0].dtype

    float32_copy.register_autograd(lambda ctx, grad: grad.to(ctx.dtype), setup_context=setup_context)


if keras.config.backend() == "torch":
    _register_torch_float32_copy()


def _xla_int8_one_row_product(row, kernel, perm):
    """`one_row_product_in_place` for XLA: `row` (float32, the contracted
    axes first) times the kernel transposed by `perm` (its kept axes, then
    the contracted ones) and flattened to `[out, in]`: `[out]`."""
    kernel = ops.transpose(kernel, perm)
    depth = math.prod(row.shape)
    table = ops.reshape(kernel, (-1, depth))
    padded = ops.pad(table, ((0, 1), (0, 0)))
    row = ops.reshape(row, (1, depth))
    has_nan = ops.any(ops.isnan(row[:, :1]))
    row = ops.cond(has_nan, lambda: ops.full_like(row, math.nan), lambda: row)
    offset = ops.cast(has_nan, "int32")
    # Rows `offset ...`: a gather (TensorFlow resolves a slice's start at
    # compile time by evaluating everything it depends on: quadratic in
    # the layers, minutes for gemma3_270m; JAX runs both alike).
    table = ops.take(padded, offset + ops.arange(table.shape[0], dtype="int32"), axis=0)
    return ops.matmul(row, ops.transpose(ops.cast(table, "float32")))


def _free_axes(equation):
    """Positions of the input axes that the kernel does not contract."""
    x_axes, kernel_axes = equation.split("->")[0].split(",")
    return [i for i, axis in enumerate(x_axes) if axis not in kernel_axes]


def _is_matmul(equation):
    """Whether `equation` is "...d,df->...f": x's last axis contracted with
    the first of a 2-D kernel, nothing else."""
    inputs, output = equation.split("->")
    x, kernel = inputs.split(",")
    return (
        len(kernel) == 2
        and x[:-1] == output[:-1]
        and x[-1] == kernel[0]
        and output[-1] == kernel[1]
        and kernel[0] not in output
    )


def einsum(equation, a, b):
    """`ops.einsum(equation, a, b)` for two operands. On JAX on CPU,
    bfloat16/float16 operands are multiplied with a float32 result, rounded
    to their dtype after, in the forward and the backward pass: XLA on CPU
    runs a product with a 16-bit result as generic loops and one with a
    float32 result through its fast kernels (AVX-512/AMX bfloat16 where the
    CPU has them), 2-3x the throughput with the same rounding. (PyTorch's
    bfloat16 matmul already works this way; TensorFlow's XLA fails at run
    time on such products when its fast kernels decline one, e.g. a
    transposed operand, so TensorFlow keeps the plain product.)
    """
    equation = _expand_ellipsis(equation, a.ndim)
    if not _accumulates_in_float32(a, b) or not _each_axis_shared(equation):
        return einsum_in_memory_order(equation, a, b)
    a_axes, b_axes, out_axes = _split(equation)

    @ops.custom_gradient
    def product(a, b):
        def grad(*args, upstream=None):
            upstream = args[0] if upstream is None else upstream
            return (
                _float32_einsum(f"{out_axes},{b_axes}->{a_axes}", upstream, b),
                _float32_einsum(f"{a_axes},{out_axes}->{b_axes}", a, upstream),
            )

        return _float32_einsum(equation, a, b), grad

    return product(a, b)


def _accumulates_in_float32(a, b):
    """Whether `einsum` multiplies `a` and `b` with a float32 result."""
    dtype = keras.backend.standardize_dtype(a.dtype)
    if keras.config.backend() != "jax" or dtype not in ("bfloat16", "float16"):
        return False
    import jax

    return keras.backend.standardize_dtype(b.dtype) == dtype and jax.default_backend() == "cpu"


def _float32_einsum(equation, a, b):
    import jax.numpy as jnp

    return jnp.einsum(equation, a, b, preferred_element_type=jnp.float32).astype(a.dtype)


def _split(equation):
    inputs, out_axes = equation.split("->")
    a_axes, b_axes = inputs.split(",")
    return a_axes, b_axes, out_axes


def _expand_ellipsis(equation, ndim):
    """Spell out a leading `...` in the first operand and the output."""
    if "..." not in equation:
        return equation
    a_axes = equation.split(",")[0]
    unused = [c for c in "zyxwvuts" if c not in equation]
    spelled = "".join(unused[: ndim - (len(a_axes) - 3)])
    return equation.replace("...", spelled)


def _each_axis_shared(equation):
    """Whether every axis of each operand is in the other operand or in the
    output (no axis summed within one operand), so the gradients are
    products of the same form."""
    a_axes, b_axes, out_axes = _split(equation)
    return all(c in b_axes + out_axes for c in a_axes) and all(
        c in a_axes + out_axes for c in b_axes
    )
