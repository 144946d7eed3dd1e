"""How `GemmaCausalLM.generate()` runs compiled on each backend: JAX's
generation function under `jax.jit`, PyTorch's `torch.compile`d decode step
driven by a Python loop, the length buckets that keep the number of
compiled shapes small, and the checks that a compiled function still
matches the model's variables."""

import os
import weakref

import keras
import numpy as np
from keras import ops
from keras_hub.samplers import GreedySampler as KerasHubGreedySampler
from keras_hub.src.utils.tensor_utils import any_equal

from keras_gemma.layers.dense import lay_out_kernels_for_decoding
from keras_gemma.layers.block_tracing import block_regions_available
from keras_gemma.layers.block_tracing import mark_blocks_for_one_trace


def variable_refs(gemma_lm):
    """Weak references to the backbone's variables (ids of deleted variables
    can be reused) and whether each is trainable, for `holds_variables`."""
    return tuple((weakref.ref(v), v.trainable) for v in gemma_lm.backbone.weights)


def holds_variables(gemma_lm, refs):
    """Whether the backbone still has exactly the variables of `refs`, each
    as trainable as it was: not after enable_lora / merge_lora /
    load_lora_weights, which a compiled function traced before would miss,
    nor after layers were frozen or unfrozen (JAX's function pairs values
    with variables by their place among the trainable and non-trainable
    ones, and same-shaped layers swapped places silently)."""
    variables = gemma_lm.backbone.weights
    return len(refs) == len(variables) and all(
        ref() is v and trainable == v.trainable for (ref, trainable), v in zip(refs, variables)
    )


def jax_compiler_options():
    """XLA options for JAX's generation functions. On CPU: 512-bit vectors
    in XLA's own loops (the int8 products of `one_row_product_in_place`):
    gemma3_270m int8 decoding 27-30 -> 24-25.5 ms per token on an AVX-512
    CPU; float32 unchanged (its products are library calls). LLVM ignores
    the preference on CPUs without 512-bit vectors."""
    import jax

    return {"xla_cpu_prefer_vector_width": 512} if jax.default_backend() == "cpu" else None


def jax_generate_function(gemma_lm):
    """`generate_step` under `jax.jit`, as KerasHub compiles it, with
    `jax_compiler_options()`."""
    import itertools

    import jax

    options = jax_compiler_options()

    def generate(inputs, stop_token_ids, state):
        sampler_values, trainable_values, non_trainable_values = state
        mapping = itertools.chain(
            zip(gemma_lm.sampler.variables, sampler_values),
            zip(gemma_lm.trainable_variables, trainable_values),
            zip(gemma_lm.non_trainable_variables, non_trainable_values),
        )
        with keras.StatelessScope(state_mapping=mapping) as scope:
            outputs = gemma_lm.generate_step(inputs, stop_token_ids)
        # The sampler's variables (random seeds) advance; nothing else may.
        new_sampler_values = []
        for variable in gemma_lm.sampler.variables:
            value = scope.get_current_value(variable)
            new_sampler_values.append(variable if value is None else value)
        return outputs, new_sampler_values

    compiled = jax.jit(generate, static_argnames=["stop_token_ids"], compiler_options=options)

    def generate_function(inputs, stop_token_ids=None):
        if isinstance(stop_token_ids, list):
            stop_token_ids = tuple(stop_token_ids)
        state = (
            [v.value for v in gemma_lm.sampler.variables],
            [v.value for v in gemma_lm.trainable_variables],
            [v.value for v in gemma_lm.non_trainable_variables],
        )
        inputs = keras.tree.map_structure(ops.convert_to_tensor, inputs)
        outputs, sampler_values = compiled(inputs, stop_token_ids, state)
        for variable, value in zip(gemma_lm.sampler.variables, sampler_values):
            variable.assign(value)
        return outputs

    generate_function.compiled = compiled
    return generate_function


def with_prefill_bucket(inputs):
    """Add `prefill_token_ids`: the first `2**k >= shortest prompt` columns
    (at least 16). Prefill then costs the prompt, not `max_length`, and the
    number of compiled shapes stays logarithmic in the prompt length."""
    mask = ops.convert_to_numpy(inputs["padding_mask"])
    bucket = prefill_bucket(int(mask.sum(axis=-1).min()), mask.shape[1])
    return {**inputs, "prefill_token_ids": inputs["token_ids"][:, :bucket]}


def prefill_bucket(prompt_length, limit):
    """`2**k >= prompt_length`, at least 16 and at most `limit`: prefill
    shapes (each compiled once) stay logarithmic in the prompt length."""
    return min(limit, max(16, 1 << max(prompt_length - 1, 0).bit_length()))


def length_bucket(length):
    """256, 512, 1024, then multiples of 1024 (a long context's cache grows
    by less than 1024 slots): the decode buffer and KV cache length for
    `length` tokens, so that nearby lengths share one compiled step."""
    if length <= 1024:
        return max(256, 1 << (length - 1).bit_length())
    return -(-length // 1024) * 1024


def padded_to_bucket(token_ids, padding_mask):
    """`token_ids` and `padding_mask` padded to `length_bucket` columns. The
    padding counts as prompt: it is never sampled and never taken for a stop
    token; the decode loop ends before it."""
    batch_size, length = ops.shape(token_ids)
    extra = length_bucket(length) - length
    token_ids = ops.pad(token_ids, [[0, 0], [0, extra]])
    padding = ops.ones((batch_size, extra), "bool")
    return token_ids, ops.concatenate([ops.cast(padding_mask, "bool"), padding], axis=1)


def python_decode_loop(decode_body, token_ids, cache, start, mask, stop_token_ids, end, left_padding=None):
    """Drive the compiled PyTorch decode step from `start` to `end`."""
    import torch

    # Tensors, not NumPy arrays: the compiled step would break on those.
    token_ids, mask = ops.convert_to_tensor(token_ids), ops.cast(mask, "bool")
    if left_padding is not None:
        left_padding = ops.convert_to_tensor(left_padding, "int32")
    if stop_token_ids is not None:
        stop_token_ids = tuple(stop_token_ids)
    index = torch.as_tensor(start, dtype=torch.int32, device=token_ids.device)
    for step in range(int(start), end):
        # The first two steps compile (or pick) the step's graphs; the same
        # objects and shapes come back at every later step.
        warm = step >= int(start) + 2
        token_ids, cache, done = decode_body(
            token_ids, cache, index, mask, stop_token_ids, left_padding, skip_guards=warm
        )
        if stop_token_ids is not None and bool(done):
            break
        index = index + 1
    return token_ids


class TorchDecodeStep:
    """The PyTorch decode step, compiled (`compiled`, a `TorchCompiledStep`).
    Random sampling breaks Dynamo's graph (`torch.multinomial`), and a
    broken graph compiled every layer apart and piece by piece: a top-p
    sampler's first `generate()` of gemma3_270m took 3-6 minutes on a 2-core
    CPU instead of greedy's 30 s. So only greedy steps compile whole; with
    other samplers the model's part compiles and the sampler runs eagerly."""

    def __init__(self, gemma_lm):
        self.gemma_lm = gemma_lm
        self.whole = isinstance(gemma_lm.sampler, KerasHubGreedySampler)
        step = gemma_lm._decode_body if self.whole else gemma_lm._decode_logits
        self.compiled = TorchCompiledStep(step, gemma_lm.backbone)

    def __call__(self, token_ids, cache, index, mask, stop_token_ids, left_padding=None, skip_guards=False):
        if self.whole:
            return self.compiled(
                token_ids, cache, index, mask, stop_token_ids, left_padding, skip_guards=skip_guards
            )
        logits, cache = self.compiled(token_ids, cache, index, left_padding, skip_guards=skip_guards)
        token_ids, done = self.gemma_lm._write_sampled_token(token_ids, logits, index, mask, stop_token_ids)
        return token_ids, cache, done


class TorchCompiledStep:
    """A `torch.compile`d decode step, with static shapes: one graph per
    (batch, length bucket), reused across calls (dynamic shapes recompiled at
    every step).

    By default (`KERAS_GEMMA_TORCH_COMPILE=1`) each decoder block is a
    nested compile region: one block of each kind is traced and compiled,
    the others reuse it. Where Dynamo cannot trace a block as a region
    (a graph break inside it, say), the step falls back to one graph of
    every block. That graph, and `step` mode, use Inductor's C++
    wrapper, which launches the kernels without Python in between (about
    1.4x faster decoding on the CPU config) but cannot call regions.

    The step is compiled as one graph when it can be, and then `skip_guards`
    skips Dynamo's guard checks, which cost milliseconds per call on a Keras
    model; a step that cannot be one graph runs eagerly.
    """

    def __init__(self, step, backbone):
        self.step = step
        self.backbone = backbone
        self.one_graph = True
        lay_out_kernels_for_decoding(backbone)
        # An older PyTorch without keyed regions compiles one graph.
        self._compile(blocks_once=torch_compile_mode() == "1" and block_regions_available())

    def _compile(self, blocks_once):
        import torch

        self.backbone.trace_blocks_once = blocks_once
        if blocks_once:
            mark_blocks_for_one_trace(self.backbone.transformer_layers)
        self.options = _torch_compile_options(cpp_wrapper=not blocks_once)
        self.compiled = torch.compile(
            self.step, dynamic=False, fullgraph=True, options=self.options,
            **recompile_budget(),
        )

    def __call__(self, *args, skip_guards=False):
        import torch

        if not self.options.get("triton.cudagraphs"):
            return self._run(*args, skip_guards=skip_guards)
        # Each replay writes its outputs where the last replay wrote its own,
        # which this step reads: the carried token ids and cache are copied
        # out before the next replay (as gpt-fast does).
        torch.compiler.cudagraph_mark_step_begin()
        outputs = self._run(*args, skip_guards=skip_guards)
        return keras.tree.map_structure(torch.clone, outputs)

    # Whether steps may skip their guards (see `_run`).
    guards_skippable = True

    def _run(self, *args, skip_guards=False):
        import torch

        if not self.one_graph:
            return self.step(*args)
        skip_guards = skip_guards and TorchCompiledStep.guards_skippable
        try:
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=skip_guards):
                return self.compiled(*args)
        except RuntimeError as error:
            if skip_guards and "skip_guard_eval_unsafe" in str(error):
                # No cached graph fits without its guards (raised on entering
                # the step, before it ran): keep the guards from now on.
                TorchCompiledStep.guards_skippable = False
                return self._run(*args)
            if not isinstance(error, torch._dynamo.exc.TorchDynamoException):
                raise
            if self.backbone.trace_blocks_once:  # Not as regions: try one graph.
                self._compile(blocks_once=False)
                return self._run(*args)
            # Not one graph either (an int8 model that quantizes its
            # activations): eager. Compiling it in pieces made Dynamo skip
            # the step's code, which every model shares, from then on: later
            # models decoded eagerly, or failed without their guards.
            self.one_graph = False
            return self.step(*args)


def recompile_budget():
    """`torch.compile` arguments with room for many compiled versions.
    Dynamo keeps at most 8 versions of one code object per process, and
    every model's step is the same code: the ninth model (or a model's
    ninth shape: one per batch size and length bucket) to generate failed
    with "recompile limit exceeded" (the decode step is one graph, where
    Dynamo does not fall back to eager). The versions stay shared, so a
    model compiled again (`compile()`) still reuses its step
    (`isolate_recompiles` would trace it again: 1.3 s against 0.02 s on a
    tiny model)."""
    import inspect

    import torch

    if "recompile_limit" not in inspect.signature(torch.compile).parameters:
        return {}  # Older PyTorch: its global limit stays.
    return {"recompile_limit": 64}


def _torch_compile_options(cpp_wrapper):
    """The C++ wrapper where asked (Inductor's C++ wrapper cannot call
    nested compile regions). On a GPU, `KERAS_GEMMA_TORCH_CUDAGRAPHS=1`
    replays each step as one CUDA graph instead (experimental: removes the
    per-kernel launch cost, which bounds a small model's decode step)."""
    if _replays_cuda_graphs():
        return {"triton.cudagraphs": True}
    return {"cpp_wrapper": True} if cpp_wrapper else {}


def _replays_cuda_graphs():
    """Whether PyTorch's decode step is replayed as CUDA graphs (above)."""
    import torch

    return torch.cuda.is_available() and os.environ.get("KERAS_GEMMA_TORCH_CUDAGRAPHS") == "1"


def torch_compile_mode():
    """`KERAS_GEMMA_TORCH_COMPILE`: "1" (default), "step" or "0"."""
    mode = os.environ.get("KERAS_GEMMA_TORCH_COMPILE", "1")
    if mode not in ("1", "step", "0"):
        raise ValueError(
            f"KERAS_GEMMA_TORCH_COMPILE={mode!r} is not a choice: use 1 (compile one "
            "decoder block per kind; the default), step (compile the decode step as one "
            "graph) or 0 (eager)."
        )
    return mode


def tensorflow_xla():
    """`KERAS_GEMMA_TF_XLA`: "1" (default: XLA) or "0" (TensorFlow graphs)."""
    mode = os.environ.get("KERAS_GEMMA_TF_XLA", "1")
    if mode not in ("1", "0"):
        raise ValueError(
            f"KERAS_GEMMA_TF_XLA={mode!r} is not a choice: use 1 (compile with XLA; the "
            "default) or 0 (run as TensorFlow graphs without XLA)."
        )
    return mode == "1"


# With max_length, prompts of different lengths are aligned only when rows
# can stop early (stop ids) and the longest prompt has at least this many
# tokens more than the shortest: aligned, the batch takes a wider shape,
# compiled once more, and a longer KV cache.
MIN_GAP_TO_ALIGN = 64


def aligned_for_generation(inputs, max_new_tokens, stop_token_ids):
    """Right-padded prompts, for a token-by-token sampler, aligned at their
    ends (`aligned_at_prompt_ends`) where that saves decode steps; else the
    inputs as they are.

    Unaligned, decoding starts at the shortest prompt's end and a longer
    prompt's other tokens pass one decode step each (KerasHub's way): with
    `max_new_tokens` every row then waits for the longest prompt. With
    `max_length` (each row up to the same total length) the shortest
    prompt needs those steps anyway, unless rows stop early: the longest
    prompt's first new token came `gap` steps late. Aligned, each row keeps
    its room: `gap` columns, rounded up to a power of two (fewer shapes to
    compile), are added, and `unaligned` cuts them off again; not where
    that would more than double the width (and the global layers' cache)."""
    mask = ops.convert_to_numpy(inputs["padding_mask"]).astype(bool)
    lengths = mask.sum(axis=-1)
    gap = int(lengths.max() - lengths.min())
    if max_new_tokens is not None and gap:
        return aligned_at_prompt_ends(inputs)
    extra_columns = 1 << max(gap - 1, 0).bit_length()
    if stop_token_ids is None or gap < MIN_GAP_TO_ALIGN or extra_columns > mask.shape[1]:
        return inputs
    return aligned_at_prompt_ends(inputs, extra_columns)


def aligned_at_prompt_ends(inputs, extra_columns=0):
    """Right-padded prompts shifted right, each row by its `left_padding`,
    so that every prompt ends at one column: the longest prompt's end, or
    with `extra_columns` (at least the longest prompt's extra length), the
    shortest's end plus those, so that the shortest prompt's room ends at
    the last column (no row needs more steps than unaligned). The shift is
    kept as `"left_padding"` and its columns count as prompt (never
    sampled). Only padding wraps around."""
    token_ids = ops.convert_to_numpy(inputs["token_ids"])
    mask = ops.convert_to_numpy(inputs["padding_mask"]).astype(bool)
    token_ids = np.pad(token_ids, [(0, 0), (0, extra_columns)])
    mask = np.pad(mask, [(0, 0), (0, extra_columns)])
    lengths = mask.sum(axis=-1)
    prompt_end = max(lengths.max(), lengths.min() + extra_columns)
    left_padding = (prompt_end - lengths).astype("int32")
    columns = np.arange(token_ids.shape[1])
    source = (columns[None, :] - left_padding[:, None]) % token_ids.shape[1]
    shifted_mask = np.take_along_axis(mask, source, axis=1) | (columns[None, :] < left_padding[:, None])
    return {
        **inputs,
        "token_ids": np.take_along_axis(token_ids, source, axis=1),
        "padding_mask": shifted_mask,
        "left_padding": left_padding,
    }


def unaligned(outputs, aligned, width):
    """`outputs` of `aligned_at_prompt_ends` inputs shifted back, `width`
    columns: each row starts at column 0 again; its columns past its last
    generated token hold what the shift brought in (`width` cuts off a
    row's tokens past its room)."""
    left_padding = aligned.get("left_padding")
    if left_padding is None:
        return outputs
    columns = np.arange(ops.shape(outputs["token_ids"])[1])
    source = ((columns[None, :] + left_padding[:, None]) % len(columns))[:, :width]
    return {
        key: ops.convert_to_tensor(np.take_along_axis(ops.convert_to_numpy(outputs[key]), source, axis=1))
        for key in ("token_ids", "padding_mask")
    }


def generated_mask(token_ids, prompt_mask, stop_token_ids):
    """True for the prompt and generated tokens up to and including the first
    stop token after the prompt; False after it."""
    if stop_token_ids is None:
        return ops.ones_like(token_ids, dtype="bool")
    generated = ops.logical_not(ops.cast(prompt_mask, "bool"))
    stops = ops.cast(any_equal(token_ids, stop_token_ids, generated), "int32")
    stops_before = ops.cumsum(stops, axis=-1) - stops
    return ops.equal(stops_before, 0)


def limited_to_new_tokens(outputs, inputs, max_new_tokens):
    """`generate()`'s outputs with at most `max_new_tokens` tokens after
    each row's prompt: later ones (a shorter prompt's, which generated up to
    the longest prompt's limit) get the inputs' padding back and leave the
    padding mask."""
    prompt_mask = ops.cast(inputs["padding_mask"], "bool")
    prompt_lengths = ops.sum(ops.cast(prompt_mask, "int32"), axis=-1)
    columns = ops.arange(ops.shape(prompt_mask)[1], dtype="int32")
    kept = columns[None, :] < (prompt_lengths + max_new_tokens)[:, None]
    token_ids = ops.convert_to_tensor(outputs["token_ids"])
    padding = ops.cast(inputs["token_ids"], token_ids.dtype)
    return {
        "token_ids": ops.where(kept, token_ids, padding),
        "padding_mask": ops.logical_and(ops.cast(outputs["padding_mask"], "bool"), kept),
    }
