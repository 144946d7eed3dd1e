"""LoRA adapters for `GemmaBackbone`: enable, save, load and merge.

The adapters are Keras' own `EinsumDense` LoRA (`layer.enable_lora`): a
projection with kernel `W` of shape `[..., out]` gets `A` `[..., rank]` and
`B` `[rank, out]` (float32), and computes with `W + (alpha / rank) * A @ B`.
`A` starts random and `B` at zero, so a freshly enabled model computes what
the base model does. Everything else in the backbone is frozen.

Target projections, by layer name (the same in every decoder block):

- attention: `"query"`, `"key"`, `"value"`, `"attention_output"`;
- feed-forward: `"ffw_gating"` (gate), `"ffw_gating_2"` (up),
  `"ffw_linear"` (down).

The default is `["query", "value"]` (as KerasHub); `"all"` targets all seven.

Saving: a `.keras` file and `save_weights` keep the base kernels and the
adapters apart (the config records rank, alpha and targets), so training
resumes from them; presets fold the adapters into the kernels, as Keras
does (KerasHub's layout); adapter files hold the adapters alone.

Adapter files hold the adapter tensors plus JSON metadata: the rank, alpha,
scale (`alpha / rank`), targeted layer names and the model dimensions they
fit. The file name picks the container, neither of which ever executes code
when read: `.safetensors` (tensors named `decoder_block_<i>/<name>/
lora_kernel_a|b`, metadata under the `keras_gemma_lora` key) or `.h5`
(for example `adapters.lora.h5`: the same tensor names as datasets, the
metadata as a root attribute). Files are backend independent.

Quantized models (QLoRA-style): `backbone.quantize("int8")` (or `"int4"`)
before `enable_lora`. The adapters stay float32 around the frozen quantized
kernels. `quantize("int8")` rounds the weights only; with a config that
rounds activations too (Keras' `Int8QuantizationConfig()`), the quantized
tied embedding would round the final hidden states to int8 before
computing the logits, and no gradient passes that rounding, so while LoRA
is enabled the logits are computed from the float hidden states (int8
weights only); `merge_lora` restores the rounding.
`merge_lora` on a quantized model requantizes the merged kernels, with a
warning: updates smaller than a quantization step are lost. To keep them,
merge into the float model and quantize after.

```python
backbone.enable_lora(rank=8, target_layer_names="all", alpha=16)
gemma_lm.compile(optimizer=keras.optimizers.Adam(1e-3))
gemma_lm.fit(texts, batch_size=4)
backbone.save_lora_weights("adapters.safetensors")

fresh = keras_gemma.GemmaCausalLM.from_preset(preset)
fresh.backbone.load_lora_weights("adapters.safetensors")  # rank, alpha, targets
fresh.backbone.merge_lora()  # plain kernels again, no adapter overhead
```
"""

import gc
import json
import os
import warnings
import weakref

import keras
import numpy as np
from keras import ops

from keras_gemma.layers.dense import HELD_INPUTS_QUANTIZER
from keras_gemma.layers.dense import LORA_A_INITIALIZER
from keras_gemma.staging import staged_file

ATTENTION_TARGETS = ("query", "key", "value", "attention_output")
MLP_TARGETS = ("ffw_gating", "ffw_gating_2", "ffw_linear")
ALL_TARGETS = ATTENTION_TARGETS + MLP_TARGETS
DEFAULT_TARGETS = ("query", "value")

FORMAT = "keras_gemma.lora"
VERSION = 1
METADATA_KEY = "keras_gemma_lora"
# The backbone dimensions that fix the adapters' shapes.
MODEL_FIELDS = (
    "num_layers",
    "hidden_dim",
    "num_query_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_dim",
)
_EXTENSIONS = (".safetensors", ".h5")


def projections(backbone):
    """`(key, name, layer)` for every LoRA-able projection of `backbone`,
    block by block, where `key` is `"decoder_block_<i>/<name>"`."""
    result = []
    for i, block in enumerate(backbone.transformer_layers):
        attention = block.attention
        layers = dict(
            zip(
                ALL_TARGETS,
                (
                    attention.query_dense,
                    attention.key_dense,
                    attention.value_dense,
                    attention.output_dense,
                    block.gating_ffw,
                    block.gating_ffw_2,
                    block.ffw_linear,
                ),
            )
        )
        for name, layer in layers.items():
            result.append((f"decoder_block_{i}/{name}", name, layer))
    return result


def enable_lora(backbone, rank, target_layer_names=None, alpha=None):
    """See `GemmaBackbone.enable_lora`."""
    rank = _check_rank(rank)
    alpha = _check_alpha(alpha, rank)
    targets = resolve_targets(target_layer_names)
    current = lora_config(backbone)
    if current is not None:
        raise ValueError(
            "LoRA is already enabled on this backbone "
            f"({_describe(current)}). Call `merge_lora()` first to fold "
            "those adapters into the weights, or start from a fresh model."
        )
    for _, name, layer in projections(backbone):
        if name in targets and layer.quantization_mode in ("gptq", "awq"):
            raise ValueError(
                f"LoRA does not support {layer.quantization_mode!r}-quantized "
                f"layers such as {layer.path!r}; use int8 or int4."
            )
    # Remember what was trainable, for `merge_lora` to restore.
    state = _SavedState(backbone)
    object.__setattr__(backbone, "_lora_saved_state", state)
    hold_embedding_inputs_quantizer(backbone)
    backbone.trainable = True
    for layer in backbone._flatten_layers(include_self=False):
        layer.trainable = False
    for _, name, layer in projections(backbone):
        if name in targets:
            layer.trainable = True
            layer.enable_lora(rank, lora_alpha=alpha, a_initializer=LORA_A_INITIALIZER)


def hold_embedding_inputs_quantizer(backbone):
    """While LoRA is enabled (`enable_lora`, or `quantize` after it): an
    activation-int8 tied embedding rounds the final hidden states to int8
    before the output projection, with no gradient through the rounding, so
    nothing before it, no adapter, would learn. The logits come from the
    float hidden states (int8 weights only) instead; `merge_lora` puts the
    quantizer back, and saving records it (`layers/dense.py`)."""
    embedding = backbone.token_embedding
    quantizer = getattr(embedding, "inputs_quantizer", None)
    if quantizer is not None:
        object.__setattr__(embedding, HELD_INPUTS_QUANTIZER, quantizer)
        embedding.inputs_quantizer = None


def _release_embedding_inputs_quantizer(backbone):
    embedding = backbone.token_embedding
    quantizer = getattr(embedding, HELD_INPUTS_QUANTIZER, None)
    if quantizer is not None:
        embedding.inputs_quantizer = quantizer
        object.__delattr__(embedding, HELD_INPUTS_QUANTIZER)


def lora_config(backbone):
    """`{"rank", "alpha", "target_layer_names"}` of the enabled adapters, or
    `None` when LoRA is not enabled."""
    enabled = [
        (key, name, layer)
        for key, name, layer in projections(backbone)
        if getattr(layer, "lora_enabled", False)
    ]
    if not enabled:
        return None
    names = {name for _, name, _ in enabled}
    targets = [name for name in ALL_TARGETS if name in names]
    ranks = {layer.lora_rank for _, _, layer in enabled}
    alphas = {float(layer.lora_alpha) for _, _, layer in enabled}
    if (
        len(ranks) > 1
        or len(alphas) > 1
        or len(enabled) != backbone.num_layers * len(targets)
    ):
        raise ValueError(
            "LoRA was enabled layer by layer with different ranks, alphas or "
            f"projections ({[key for key, _, _ in enabled]}, ranks "
            f"{sorted(ranks)}, alphas {sorted(alphas)}). keras_gemma adapters "
            "need one rank and alpha and the same projections in every "
            "decoder block: use `backbone.enable_lora(...)`."
        )
    layer = enabled[0][2]
    return {
        "rank": int(layer.lora_rank),
        "alpha": layer.lora_alpha,
        "target_layer_names": targets,
    }


def save_lora_weights(backbone, filepath):
    """See `GemmaBackbone.save_lora_weights`."""
    path = _check_path(filepath)
    config = lora_config(backbone)
    if config is None:
        raise ValueError(
            "LoRA is not enabled on this backbone, so there are no adapters "
            "to save. Call `backbone.enable_lora(rank)` (and train) first."
        )
    tensors = {}
    for key, _, layer in projections(backbone):
        if layer.lora_enabled:
            for variable in (layer.lora_kernel_a, layer.lora_kernel_b):
                value = ops.convert_to_numpy(variable)
                tensors[f"{key}/{variable.name}"] = np.ascontiguousarray(
                    value, dtype="float32"
                )
    _check_finite(tensors, "This model's adapters", "nothing was saved")
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "rank": config["rank"],
        "alpha": config["alpha"],
        "scale": config["alpha"] / config["rank"],
        "target_layer_names": config["target_layer_names"],
        "model": {field: getattr(backbone, field) for field in MODEL_FIELDS},
    }
    _write(path, tensors, metadata)


def read_adapter_metadata(filepath):
    """The metadata dict of an adapter file written by `save_lora_weights`:
    `format`, `version`, `rank`, `alpha`, `scale`, `target_layer_names`
    and `model` (the backbone dimensions)."""
    metadata, _ = _read(_check_path(filepath), load_tensors=False)
    return metadata


def load_lora_weights(backbone, filepath):
    """See `GemmaBackbone.load_lora_weights`."""
    path = _check_path(filepath)
    if path.endswith(".h5") and _is_keras_hub_file(path):
        metadata, tensors = _read_keras_hub_file(backbone, path)
    else:
        metadata, tensors = _read(path)
    _check_model(backbone, metadata, path)
    rank = _check_rank(metadata["rank"])
    alpha = _check_alpha(metadata["alpha"], rank)
    targets = resolve_targets(metadata["target_layer_names"])

    # Check everything before changing the model.
    expected = {}
    for key, name, layer in projections(backbone):
        if name in targets:
            kernel_shape = _kernel_shape(layer)
            expected[f"{key}/lora_kernel_a"] = kernel_shape[:-1] + (rank,)
            expected[f"{key}/lora_kernel_b"] = (rank, kernel_shape[-1])
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{path} does not match its own metadata (targets {targets}): "
            f"missing tensors {missing}, unexpected tensors {extra}."
        )
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(
                f"{path}: tensor {key!r} has shape {tuple(tensors[key].shape)} "
                f"but this model needs {shape}; the adapters were saved from "
                "a model of another shape."
            )
    _check_finite(tensors, f"The adapters in {path}", "the model is unchanged")
    current = lora_config(backbone)
    if current is not None:
        wanted = {"rank": rank, "alpha": alpha, "target_layer_names": targets}
        mismatches = [
            f"{field}: file {wanted[field]!r}, model {current[field]!r}"
            for field in ("rank", "alpha", "target_layer_names")
            if (
                float(wanted[field]) != float(current[field])
                if field == "alpha"
                else wanted[field] != current[field]
            )
        ]
        if mismatches:
            raise ValueError(
                f"The adapters in {path} do not fit the LoRA enabled on this "
                f"model ({'; '.join(mismatches)}). Load them into a model "
                "without LoRA enabled: `load_lora_weights` enables it with "
                "the file's rank, alpha and targets."
            )
    else:
        enable_lora(backbone, rank, targets, alpha)

    for key, _, layer in projections(backbone):
        if layer.lora_enabled:
            layer.lora_kernel_a.assign(tensors[f"{key}/lora_kernel_a"])
            layer.lora_kernel_b.assign(tensors[f"{key}/lora_kernel_b"])


def merge_lora(backbone):
    """See `GemmaBackbone.merge_lora`."""
    if lora_config(backbone) is None:
        raise ValueError(
            "LoRA is not enabled on this backbone; there is nothing to merge."
        )
    layers = [
        layer for _, _, layer in projections(backbone) if layer.lora_enabled
    ]
    for layer in layers:
        mode = layer.quantization_mode
        if mode not in (None, "int8", "int4"):
            raise NotImplementedError(
                f"merge_lora supports float, int8 and int4 kernels; layer "
                f"{layer.path!r} is quantized with {mode!r}."
            )
    quantized = sorted({layer.quantization_mode for layer in layers} - {None})
    if quantized:
        warnings.warn(
            f"merge_lora() on {'/'.join(quantized)} kernels requantizes them: "
            "changes smaller than a quantization step round away, so a short "
            "or gentle fine-tune can lose much of its effect. For the logits "
            "the adapters give, merge into the float model and quantize "
            "after: load it, `load_lora_weights(path)`, `merge_lora()`, "
            "`quantize(...)`.",
            stacklevel=3,
        )
    for layer in layers:
        _merge_layer(layer)
    gc.collect()  # Free the adapters' memory now, as `del` on a layer does.
    state = getattr(backbone, "_lora_saved_state", None)
    if state is None:
        backbone.trainable = True
    else:
        state.restore(backbone)
    _release_embedding_inputs_quantizer(backbone)
    object.__setattr__(backbone, "_lora_saved_state", None)


def resolve_targets(target_layer_names):
    """Target names in canonical order from `None` (the default query and
    value), `"all"`, one name, or a list of names."""
    if target_layer_names is None:
        return list(DEFAULT_TARGETS)
    if isinstance(target_layer_names, str):
        if target_layer_names == "all":
            return list(ALL_TARGETS)
        target_layer_names = [target_layer_names]
    names = list(target_layer_names)
    if not names:
        raise ValueError(
            "target_layer_names is empty; give projection names from "
            f"{list(ALL_TARGETS)}, or 'all'."
        )
    unknown = [name for name in names if name not in ALL_TARGETS]
    if unknown:
        raise ValueError(
            f"target_layer_names {unknown} match no layer of GemmaBackbone. "
            f"Available projection names: {list(ALL_TARGETS)} (attention: "
            f"{list(ATTENTION_TARGETS)}; feed-forward gate, up, down: "
            f"{list(MLP_TARGETS)}), or 'all' for every one of them."
        )
    return [name for name in ALL_TARGETS if name in names]


class _SavedState:
    """What `enable_lora` changes besides adding adapters and holding the
    embedding's input quantizer: the `trainable` flags of the layers and
    variables. A plain object, so that Keras' attribute tracking leaves it
    alone."""

    def __init__(self, backbone):
        self.layers = [
            (layer, layer._trainable)
            for layer in backbone._flatten_layers(include_self=True)
        ]
        # Weak: `quantize()` after `enable_lora` replaces float kernels,
        # which must not stay in memory for this.
        self.variables = [(weakref.ref(v), v.trainable) for v in backbone.weights]

    def restore(self, backbone):
        for layer, trainable in self.layers:
            layer._trainable = trainable
        for variable, trainable in self.variables:
            if variable() is not None:
                variable().trainable = trainable


def _merge_layer(layer):
    """Fold `(alpha / rank) * A @ B` into the kernel (Keras' formula), then
    drop the adapters so that the layer is a plain `EinsumDense` again."""
    if layer.quantization_mode is None:
        # In float32 on the host, one layer at a time (on JAX, eager ops
        # would compile once per kernel shape). A float32 kernel plus the
        # update is what the LoRA layer computes with; a bfloat16 one is
        # rounded once, after the addition.
        def host(variable):
            return np.asarray(ops.convert_to_numpy(variable), dtype="float32")

        scale = np.float32(layer.lora_alpha / layer.lora_rank)
        delta = scale * np.matmul(
            host(layer.lora_kernel_a), host(layer.lora_kernel_b)
        )
        kernel = layer._kernel
        kernel.assign(ops.cast(host(kernel) + delta, kernel.dtype))
    else:
        # Dequantize, add, requantize: what Keras saves for a quantized
        # LoRA layer.
        with warnings.catch_warnings():
            # Keras converts torch tensors with `np.array`: NumPy's
            # DeprecationWarning about `__array__`'s copy keyword, per layer.
            warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
            kernel, scale, zero = layer._get_kernel_with_merged_lora()
        layer._kernel.assign(kernel)
        layer.kernel_scale.assign(scale)
        if zero is not None:
            layer.kernel_zero.assign(zero)
    for name in ("lora_kernel_a", "lora_kernel_b"):
        # What `del layer.<name>` does (untrack the variable, which also
        # drops it from torch's parameters) minus its `gc.collect()` per
        # variable: `merge_lora` collects once at the end.
        layer._untrack_variable(getattr(layer, name))
        super(keras.layers.Layer, layer).__delattr__(name)
    layer.lora_enabled = False
    layer.lora_rank = None
    layer.lora_alpha = None


def _kernel_shape(layer):
    if layer.quantization_mode == "int4":  # Stored packed.
        return tuple(layer.original_kernel_shape)
    return tuple(layer._kernel.shape)


def _check_rank(rank):
    if isinstance(rank, (bool, np.bool_)) or not isinstance(
        rank, (int, np.integer)
    ) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer; got rank={rank!r}.")
    return int(rank)


def _check_alpha(alpha, rank):
    if alpha is None:
        return rank
    if (
        isinstance(alpha, (bool, np.bool_))
        or not isinstance(alpha, (int, float, np.integer, np.floating))
        or not np.isfinite(alpha)
        or alpha <= 0
    ):
        raise ValueError(
            f"LoRA alpha must be a positive number (the adapters are scaled "
            f"by alpha / rank); got alpha={alpha!r}."
        )
    return alpha.item() if isinstance(alpha, np.generic) else alpha


def _describe(config):
    return (
        f"rank={config['rank']}, alpha={config['alpha']}, "
        f"target_layer_names={config['target_layer_names']}"
    )


def _check_finite(tensors, whose, outcome):
    """NaN or infinite adapters (a diverged training) make every logit NaN:
    greedy generation then returned an empty text, with no error."""
    bad = {key: int(np.size(value) - np.isfinite(value).sum()) for key, value in tensors.items()}
    bad = {key: count for key, count in bad.items() if count}
    if bad:
        first = next(iter(bad))
        raise ValueError(
            f"{whose} hold {sum(bad.values())} NaN or infinite values ({len(bad)} "
            f"tensors, e.g. {first!r}); {outcome}. Training diverged: train "
            "again with a lower learning rate (`keras.callbacks.TerminateOnNaN` "
            "stops fit() when the loss becomes NaN)."
        )


def _check_path(filepath):
    path = os.fspath(filepath) if isinstance(filepath, (str, os.PathLike)) else None
    if path is None or not str(path).endswith(_EXTENSIONS):
        raise ValueError(
            "The adapter file name must end in `.safetensors` or `.h5` (for "
            f"example `adapters.lora.h5`); got {filepath!r}."
        )
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory; the adapters go to a file of that name.")
    return str(path)


def _check_model(backbone, metadata, path):
    model = metadata.get("model")
    if model is None:
        return
    mismatches = [
        f"{field}={model.get(field)} (this model: {getattr(backbone, field)})"
        for field in MODEL_FIELDS
        if model.get(field) != getattr(backbone, field)
    ]
    if mismatches:
        raise ValueError(
            f"The adapters in {path} were saved from a model of another "
            f"shape: {', '.join(mismatches)}."
        )


def _write(path, tensors, metadata):
    """Write the adapter file; an existing one is replaced only once the new
    one is complete."""
    text = json.dumps(metadata)
    with staged_file(path) as partial:
        if path.endswith(".safetensors"):
            from safetensors.numpy import save_file

            save_file(tensors, partial, metadata={METADATA_KEY: text})
        else:
            import h5py

            with h5py.File(partial, "w") as f:
                f.attrs[METADATA_KEY] = text
                for key, value in tensors.items():
                    f.create_dataset(key, data=value)


def _read(path, load_tensors=True):
    """`(metadata, {name: array})` of one of our adapter files."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No LoRA adapter file at {path}.")
    from safetensors import SafetensorError

    try:
        text, tensors = _read_file(path, load_tensors)
        metadata = None if text is None else json.loads(text)
    except (OSError, ValueError, SafetensorError) as e:
        raise ValueError(
            f"{path} is not a readable LoRA adapter file ({e}); it may be truncated "
            "or corrupt: save the adapters again."
        ) from None
    if metadata is None:
        raise ValueError(
            f"{path} is not a keras_gemma LoRA adapter file (it has no "
            f"{METADATA_KEY!r} metadata); write one with "
            "`backbone.save_lora_weights(path)`."
        )
    missing = [key for key in ("rank", "alpha", "target_layer_names") if key not in metadata]
    if metadata.get("format") != FORMAT or missing:
        raise ValueError(f"{path} is not a keras_gemma LoRA adapter file (or a damaged one).")
    if metadata.get("version", 0) > VERSION:
        raise ValueError(
            f"{path} was written by a newer keras_gemma (adapter format "
            f"version {metadata['version']}; this one reads {VERSION})."
        )
    return metadata, tensors


def _read_file(path, load_tensors):
    """`(metadata text or None, {name: array})` as stored."""
    tensors = {}
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="np") as f:
            text = (f.metadata() or {}).get(METADATA_KEY)
            if load_tensors:
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        return text, tensors
    import h5py

    with h5py.File(path, "r") as f:
        text = f.attrs.get(METADATA_KEY)
        if text is not None and load_tensors:

            def visit(name, obj):
                if isinstance(obj, h5py.Dataset):
                    tensors[name] = obj[()]

            f.visititems(visit)
    return text, tensors


def _is_keras_hub_file(path):
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return METADATA_KEY not in f.attrs and "lora/vars/rank" in f
    except OSError:  # Unreadable: `_read` says so.
        return False


def _keras_hub_skeleton(backbone):
    """A KerasHub backbone with `backbone`'s layers in KerasHub's own order,
    at tiny sizes. That order differs from ours where there are sandwich or
    query/key norms (Gemma 2 and 3), and KerasHub's adapter files key each
    adapter by its layer's position in it."""
    import keras_hub

    sizes = dict(
        vocabulary_size=8, num_layers=backbone.num_layers, num_query_heads=2,
        num_key_value_heads=1, hidden_dim=8, intermediate_dim=8, head_dim=4,
        use_post_ffw_norm=backbone.use_sandwich_norms,
        use_post_attention_norm=backbone.use_sandwich_norms, dtype="float32",
    )
    if backbone.use_query_key_norm:
        return keras_hub.models.Gemma3Backbone(image_size=8, vision_encoder=None, **sizes)
    return keras_hub.models.GemmaBackbone(**sizes)


def _read_keras_hub_file(backbone, path):
    """KerasHub's `Backbone.save_lora_weights` format (what keras_gemma wrote
    before it had its own): the rank, and adapters keyed by the index of
    their layer among KerasHub's backbone's layers with weights. No alpha
    (it was the rank) and no target names (they follow from the layers)."""
    import h5py

    skeleton = _keras_hub_skeleton(backbone)
    layers = [layer for layer in skeleton._flatten_layers(include_self=False) if layer.weights]
    keys = {id(layer): (key, name) for key, name, layer in projections(skeleton)}
    tensors, names = {}, set()
    with h5py.File(path, "r") as f:
        rank = int(f["lora/vars/rank"][()])
        for index in f["lora"]:
            if index == "vars":
                continue
            position = int(index) if index.isdigit() else len(layers)
            layer = layers[position] if position < len(layers) else None
            if layer is None or id(layer) not in keys:
                raise ValueError(
                    f"{path}: KerasHub adapter file whose layer {index} is not "
                    "a projection of this model; it was saved from another "
                    "model."
                )
            key, name = keys[id(layer)]
            names.add(name)
            for variable in ("lora_kernel_a", "lora_kernel_b"):
                tensors[f"{key}/{variable}"] = f[f"lora/{index}/vars/{variable}"][()]
    metadata = {
        "format": FORMAT,
        "rank": rank,
        "alpha": rank,
        "target_layer_names": [name for name in ALL_TARGETS if name in names],
    }
    return metadata, tensors
