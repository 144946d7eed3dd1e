"""`GemmaBackbone.get_layout_map`: how to shard the weights over a device
mesh for `keras.distribution.ModelParallel` (JAX)."""

import re

import keras

from keras_gemma.presets import catalog
from keras_gemma.presets import check_preset

# KerasHub's GemmaBackbone layouts (the Gemma team's training sharding,
# arXiv:2403.08295): `model` shards heads and the MLP's inner dimension,
# `batch` (the data axis) the model dimension. Our weight paths are KerasHub's.
LAYOUTS = {
    "token_embedding/embeddings": ("model", "batch"),
    "decoder_block.*attention.*query.kernel": ("model", "batch", None),
    "decoder_block.*attention.*(key|value).kernel": ("model", "batch", None),
    "decoder_block.*attention_output.kernel": ("model", None, "batch"),
    "decoder_block.*ffw_gating.kernel": ("batch", "model"),
    "decoder_block.*ffw_gating_2.kernel": ("batch", "model"),
    "decoder_block.*ffw_linear.kernel": ("model", "batch"),
}

# An int4 weight (Keras' int4 `EinsumDense` kernel, `Embedding` table) is
# 2-D: the float weight's values in memory order, reshaped (a kernel to
# [contracted, kept]) and packed two to a byte along the last axis. A block
# of its rows is then a block of the float weight's first axis, so the rows
# take that axis' layout; its columns take the float weight's last axis'
# layout where they are that axis (2-D weights, the attention output) and
# stay whole where they interleave the heads with another axis (query,
# key, value). Per pattern: the float axis each int4 axis takes its layout
# from.
INT4_FLOAT_AXES = dict(zip(LAYOUTS, [(0, 1), (0, None), (0, None), (0, 2), (0, 1), (0, 1), (0, 1)]))

BLOCK_WEIGHTS = [
    "attention/query", "attention/key", "attention/value", "attention/attention_output",
    "ffw_gating", "ffw_gating_2", "ffw_linear",
]


def _shapes(config):
    """Each pattern's weight shape in a backbone of this config."""
    vocabulary, hidden = config["vocabulary_size"], config["hidden_dim"]
    heads, kv_heads = config["num_query_heads"], config["num_key_value_heads"]
    head_dim, intermediate = config["head_dim"], config["intermediate_dim"]
    return dict(zip(LAYOUTS, [
        (vocabulary, hidden),
        (heads, hidden, head_dim),
        (kv_heads, hidden, head_dim),
        (heads, head_dim, hidden),
        (hidden, intermediate),
        (hidden, intermediate),
        (intermediate, hidden),
    ]))


def _int4_shapes(config):
    """Each pattern's packed int4 weight shape in a backbone of this config."""
    vocabulary, hidden = config["vocabulary_size"], config["hidden_dim"]
    heads, kv_heads = config["num_query_heads"], config["num_key_value_heads"]
    head_dim, intermediate = config["head_dim"], config["intermediate_dim"]
    half = lambda size: (size + 1) // 2  # noqa: E731
    return dict(zip(LAYOUTS, [
        (vocabulary, half(hidden)),
        (hidden, half(heads * head_dim)),
        (hidden, half(kv_heads * head_dim)),
        (heads * head_dim, half(hidden)),
        (hidden, half(intermediate)),
        (hidden, half(intermediate)),
        (intermediate, half(hidden)),
    ]))


def _int4_weight_paths(config):
    """The paths of the weights in LAYOUTS that a backbone of this config
    stores as int4 (a quantized model's config records each layer's dtype
    policy, by its path)."""
    policy = keras.dtype_policies.get(config.get("dtype"))
    paths = ["token_embedding/embeddings"] + [
        f"decoder_block_{i}/{weight}/kernel" for i in range(config["num_layers"]) for weight in BLOCK_WEIGHTS
    ]

    def layer_policy(path):
        if isinstance(policy, keras.dtype_policies.DTypePolicyMap):
            return policy[path.rsplit("/", 1)[0]]
        return policy

    return [path for path in paths if layer_policy(path).quantization_mode == "int4"]


def _whole_where_not_divided(axes, shape, axis_sizes):
    """`axes`, with an axis the mesh does not divide left whole (JAX refuses
    to split 1 key/value head over 2 devices)."""
    return [axis if axis is None or size % axis_sizes[axis] == 0 else None for axis, size in zip(axes, shape)]


def get_layout_map(device_mesh, model_parallel_dim_name="model", data_parallel_dim_name="batch", config=None):
    if not isinstance(device_mesh, keras.distribution.DeviceMesh):
        raise TypeError(
            f"get_layout_map: device_mesh must be a keras.distribution.DeviceMesh, got "
            f"{type(device_mesh).__name__}."
        )
    axis_sizes = dict(zip(device_mesh.axis_names, device_mesh.shape))
    for role, name in (("model_parallel_dim_name", model_parallel_dim_name), ("data_parallel_dim_name", data_parallel_dim_name)):
        if name not in axis_sizes:
            raise ValueError(
                f"get_layout_map: {role}={name!r} is not an axis of the device mesh "
                f"(its axes: {', '.join(map(repr, device_mesh.axis_names))})."
            )
    if isinstance(config, str):
        check_preset(config)
        if config not in catalog():
            raise ValueError(
                f"get_layout_map: config={config!r} is not a catalog name; pass the backbone's "
                "config instead (`GemmaBackbone.from_preset(..., load_weights=False).get_config()`)."
            )
        config = catalog()[config]["config"]
    if isinstance(config, dict) and isinstance(config.get("config"), dict):
        config = config["config"]  # A preset's config.json.
    shapes = _shapes(config) if config is not None else {}
    names = {"model": model_parallel_dim_name, "batch": data_parallel_dim_name}
    layout_map = keras.distribution.LayoutMap(device_mesh)
    for pattern, axes in LAYOUTS.items():
        axes = [names.get(axis) for axis in axes]
        if pattern in shapes:
            axes = _whole_where_not_divided(axes, shapes[pattern], axis_sizes)
        layout_map[pattern] = tuple(axes)
    if config is None:
        return layout_map
    # Each int4 weight by its exact path, which Keras looks up before the
    # patterns: its 2-D layout.
    int4_shapes = _int4_shapes(config)
    for path in _int4_weight_paths(config):
        pattern = next(pattern for pattern in LAYOUTS if re.fullmatch(pattern, path))
        float_axes = layout_map[pattern].axes
        axes = [None if i is None else float_axes[i] for i in INT4_FLOAT_AXES[pattern]]
        if path in LAYOUTS:  # The embedding's pattern is its path.
            del layout_map[path]
        layout_map[path] = tuple(_whole_where_not_divided(axes, int4_shapes[pattern], axis_sizes))
    return layout_map
