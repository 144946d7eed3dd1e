"""`GemmaBackbone.get_layout_map`: how to shard the weights over a device
mesh for `keras.distribution.ModelParallel` (JAX)."""

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
            # An axis the mesh does not divide stays whole (JAX refuses to
            # split 1 key/value head over 2 devices).
            axes = [
                axis if axis is None or size % axis_sizes[axis] == 0 else None
                for axis, size in zip(axes, shapes[pattern])
            ]
        layout_map[pattern] = tuple(axes)
    return layout_map
