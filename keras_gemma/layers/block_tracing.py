"""Decoder blocks traced once per kind: the other blocks of the same
structure reuse the trace on their own weights (PyTorch's nested compile
regions, TensorFlow functions on a template block), so that compiling a
model costs about one block of each kind, not every layer."""

import keras

def mark_blocks_for_one_trace(blocks):
    """Give each decoder block a key naming its structure (its layers'
    classes, configs without names, quantization and LoRA state, weight
    shapes and dtypes), for `call_block_traced_once`: blocks with one key
    compute the same function of their own weights."""
    if not _BLOCK_REGION:  # Made outside of tracing: Dynamo cannot trace its making.
        _BLOCK_REGION.append(_block_region())
    for block in blocks:
        block.structure_key = hash(_structure(block)) & 0x7FFFFFFF


def _structure(block):
    structure = []
    for layer in block._flatten_layers():
        config = layer.get_config()
        config.pop("name", None)
        weights = [(tuple(w.shape), w.dtype) for w in layer._trainable_variables
                   + layer._non_trainable_variables]
        structure.append((type(layer).__qualname__, repr(sorted(config.items())), weights))
    return repr(structure)


def call_block_traced_once_tf(block, x, cache, cache_update_index, cache_write_end, left_padding, functions):
    """`block(x, cache=cache, ...)` inside a TensorFlow trace, through one
    `tf.function` per block structure (kept in `functions`): it runs a
    template block on the weights it is given (`keras.StatelessScope`), so
    TensorFlow traces one block of each kind instead of every block
    (gemma3_270m: 2 of 18; its first `generate()` 19.8 -> 13.4 s). XLA
    still compiles each call (it inlines them)."""
    import tensorflow as tf

    structure = _structure(block)
    entry = functions.get(structure)
    if entry is None or _structure(entry[0]) != structure:  # The template changed since.
        template = block

        def call(values, x, cache, cache_update_index, cache_write_end, left_padding):
            with keras.StatelessScope(state_mapping=list(zip(template.variables, values))):
                return template(
                    x, cache=cache, cache_update_index=cache_update_index,
                    cache_write_end=cache_write_end, left_padding=left_padding, training=False,
                )

        entry = functions[structure] = (template, tf.function(call, autograph=False))
    values = [variable.value for variable in block.variables]
    return entry[1](values, x, cache, cache_update_index, cache_write_end, left_padding)


def call_block_traced_once(block, x, cache, cache_update_index, left_padding=None):
    """`block(x, cache=cache, ...)` inside a `torch.compile` trace, as a
    nested compile region: Dynamo traces one block per `structure_key`
    (`mark_blocks_for_one_trace`) and Inductor compiles it once, then every
    other block with that key reuses it on its own weights. (gemma3_270m:
    2 blocks traced instead of 18.)"""
    key, value = cache
    x, key, value = _BLOCK_REGION[0](block, x, key, value, cache_update_index, left_padding)
    return x, (key, value)


_BLOCK_REGION = []


def block_regions_available():
    """Whether this PyTorch reuses nested compile regions by a key (2.13
    does)."""
    import inspect

    import torch

    region = getattr(torch.compiler, "nested_compile_region", None)
    return region is not None and "reuse_hash_fn" in inspect.signature(region).parameters


def _block_region():
    import torch

    def structure_key(block, x, key, value, cache_update_index, left_padding):
        return block.structure_key

    # Flat tensors in and out: what a region must take to be reused.
    @torch.compiler.nested_compile_region(reuse_hash_fn=structure_key)
    def block_region(block, x, key, value, cache_update_index, left_padding):
        x, (key, value) = block(
            x, cache=(key, value), cache_update_index=cache_update_index,
            left_padding=left_padding, training=False,
        )
        return x, key, value

    return block_region
