"""KerasHub-format preset directories: ours and the official KerasHub ones.

A preset written by `save_to_preset` (ours, `keras_gemma>...` classes) and one
written by KerasHub (`keras_hub>GemmaBackbone`, the Kaggle Keras format) share
the file layout and the weight names; only the class names and a few backbone
arguments differ. `translate_config` maps a KerasHub config tree onto ours, and
`GemmaPresetLoader` applies it to everything it reads, so one loading path
serves both.

KerasHub Gemma 3 presets (`keras_hub>Gemma3Backbone`, text-only) translate the
same way, but their `model.weights.h5` names each block after its class
(`gemma3_decoder_block_3`) where ours say `gemma_decoder_block_3`, so Keras'
`load_weights` cannot read them: `load_keras_hub_gemma3_weights` assigns each
of our variables from its KerasHub path instead (all of a layer's weights, in
Keras' order: a quantized layer's scales too).
"""

import contextlib
import copy
import json
import re

from keras_hub.src.utils.preset_utils import MODEL_WEIGHTS_FILE
from keras_hub.src.utils.preset_utils import PREPROCESSOR_CONFIG_FILE
from keras_hub.src.utils.preset_utils import SHARDED_MODEL_WEIGHTS_CONFIG_FILE
from keras_hub.src.utils.preset_utils import TOKENIZER_CONFIG_FILE
from keras_hub.src.utils.preset_utils import KerasPresetLoader
from keras_hub.src.utils.preset_utils import PresetLoader
from keras_hub.src.utils.preset_utils import get_file
from keras_hub.src.utils.preset_utils import load_json

from keras_gemma.checkpoints.downloads import fetch_failure
from keras_gemma.layers.dense import keras_default_int8

_CLASS_NAMES = (
    "GemmaBackbone",
    "GemmaTokenizer",
    "GemmaCausalLMPreprocessor",
    "GemmaCausalLM",
)
KERAS_HUB_CLASSES = {
    f"{package}>{name}": f"keras_gemma>{name}"
    for package in ("keras_hub", "keras_nlp")
    for name in _CLASS_NAMES
}
# KerasHub's Gemma 3 classes (text-only models) map onto the same ones.
KERAS_HUB_CLASSES.update(
    {
        f"keras_hub>{name.replace('Gemma', 'Gemma3')}": f"keras_gemma>{name}"
        for name in _CLASS_NAMES
    }
)
KERAS_HUB_GEMMA3_BACKBONE = "keras_hub>Gemma3Backbone"
# Arguments of KerasHub's Gemma 3 preprocessing classes that only serve images.
_GEMMA3_VISION_ARGUMENTS = (
    "has_vision_tokens",
    "image_converter",
    "num_vision_tokens_per_image",
    "max_images_per_prompt",
)


def preset_file_exists(preset, path):
    """KerasHub's `check_file_exists`, except that a file that could not be
    downloaded (a dropped connection, a gated file's 403: KerasHub's
    FileNotFoundError too) is that error, not a missing file. Offline,
    huggingface_hub cannot tell a file the repo lacks from one its cache
    lacks (`LocalEntryNotFoundError`): missing, as a cached preset's
    optional files are (a sharded preset's single weights file)."""
    try:
        get_file(preset, path)
    except FileNotFoundError as e:
        failure = fetch_failure(e)
        if failure is not None and type(failure).__name__ != "LocalEntryNotFoundError":
            raise
        return False
    return True


class DamagedPresetFile(ValueError):
    pass


def read_preset_json(preset, filename):
    """A preset's JSON file (a mapping, as every one a preset holds), or a
    `DamagedPresetFile` error naming it."""
    try:
        value = load_json(preset, filename)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # (Not UTF-8: the latter.)
        raise DamagedPresetFile(
            f"{preset}/{filename} is not valid JSON ({e}): the preset is "
            "damaged. Save or download it again."
        ) from e
    if not isinstance(value, dict):
        kind = "null" if value is None else {list: "an array", str: "a string", bool: "a boolean"}.get(type(value), "a number")
        raise DamagedPresetFile(
            f"{preset}/{filename} holds {kind}, not a JSON object: "
            "the preset is damaged. Save or download it again."
        )
    return value


def read_serialized_object(preset, filename):
    """A preset's JSON file holding one serialized Keras object (a tokenizer
    or preprocessor), or a `DamagedPresetFile` error naming it."""
    config = read_preset_json(preset, filename)
    if not (
        isinstance(config.get("registered_name"), str)
        and isinstance(config.get("config"), dict)
    ):
        raise DamagedPresetFile(
            f"{preset}/{filename} is not a serialized Keras object (a mapping "
            "with 'registered_name' and 'config'): the preset is damaged. "
            "Save or download it again."
        )
    return config


def backbone_kwargs_from_keras_hub(config, gemma3=False):
    """Map a KerasHub `GemmaBackbone` (Gemma 1/2) or text-only
    `Gemma3Backbone` config onto ours.

    The families differ in KerasHub in what it hard-codes: Gemma 1/2 store
    twice the gate width and slide on even layers; Gemma 3 slides unless
    `i % 6 == 5` and fixes the RoPE bases (10k local, 1M global), with
    `global_rope_scaling_factor` as the global layers' linear scaling.
    """
    config = dict(config)
    num_layers = config["num_layers"]
    if gemma3:
        _reject_unsupported_gemma3(config)
        for key in ("image_size", "pooling_intermediate_dim", "embedding_dim"):
            config.pop(key, None)
        config["rope_max_wavelength"] = 1_000_000.0
        config["local_rope_max_wavelength"] = 10_000.0
        config["rope_scaling_factor"] = config.pop("global_rope_scaling_factor", 1.0)
    else:
        config["intermediate_dim"] = config["intermediate_dim"] // 2
    post_attention = config.pop("use_post_attention_norm", False)
    post_ffw = config.pop("use_post_ffw_norm", False)
    if post_attention != post_ffw:
        raise ValueError(
            "KerasHub Gemma config with use_post_attention_norm="
            f"{post_attention} but use_post_ffw_norm={post_ffw}: no Gemma "
            "release mixes these; keras_gemma supports both on or both off."
        )
    config["use_sandwich_norms"] = post_attention
    # KerasHub's decoder blocks ignore this flag (Gemma 2 27B and Gemma 3
    # 27B then get the wrong scale); we honour it: False means
    # hidden_dim / num_query_heads (144 and 168, as in transformers).
    if not config.pop("query_head_dim_normalize", True):
        config["query_scale"] = config["hidden_dim"] // config["num_query_heads"]
    window = config.pop("sliding_window_size", None)
    if config.pop("use_sliding_window_attention", False):
        config["sliding_window"] = window
        config["layer_types"] = [
            ("global" if i % 6 == 5 else "sliding") if gemma3
            else ("sliding" if i % 2 == 0 else "global")
            for i in range(num_layers)
        ]
    return config


def _reject_unsupported_gemma3(config):
    unsupported = []
    if config.pop("vision_encoder", None) is not None:
        unsupported.append("a vision encoder (keras_gemma loads text-only Gemma 3)")
    if config.pop("is_embedding_model", False):
        unsupported.append("is_embedding_model=True (EmbeddingGemma)")
    if config.pop("use_bidirectional_attention", False):
        unsupported.append("use_bidirectional_attention=True")
    local_scaling = config.pop("local_rope_scaling_factor", 1.0)
    if local_scaling != 1.0:
        unsupported.append(f"local_rope_scaling_factor={local_scaling}")
    if unsupported:
        raise ValueError(
            "KerasHub Gemma 3 config with " + ", ".join(unsupported) + ": "
            "keras_gemma cannot load it."
        )


def translate_config(config):
    """Return a copy of a serialized Keras object tree with KerasHub Gemma
    classes replaced by ours (backbone arguments translated)."""
    config = copy.deepcopy(config)

    def visit(node):
        if isinstance(node, dict):
            name = node.get("registered_name")
            if name in KERAS_HUB_CLASSES:
                node["registered_name"] = KERAS_HUB_CLASSES[name]
                node["module"] = "keras_gemma"
                if name.endswith(">GemmaBackbone"):
                    node["config"] = backbone_kwargs_from_keras_hub(node["config"])
                elif name == KERAS_HUB_GEMMA3_BACKBONE:
                    node["config"] = backbone_kwargs_from_keras_hub(
                        node["config"], gemma3=True
                    )
                elif name.startswith("keras_hub>Gemma3"):
                    for key in _GEMMA3_VISION_ARGUMENTS:
                        node["config"].pop(key, None)
                    if name.endswith("Preprocessor"):
                        # KerasHub's Gemma 3 stops on both; keep that default.
                        node["config"]["stop_tokens"] = ["<eos>", "<end_of_turn>"]
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(config)
    return config


def _unreadable_weights(source, error):
    return OSError(
        f"Cannot read the weights in {source}: {error}\n"
        "It is probably truncated or corrupt (an interrupted download or "
        "copy): download or save the preset again."
    )


# A decoder block's group in a Keras weights file (`model.weights.h5`), or in
# a sharded file's weight map (`/layers/gemma_decoder_block_3/.../vars`;
# KerasHub's Gemma 3: `gemma3_decoder_block_3`).
_DECODER_BLOCK_PATH = re.compile(r"^/?layers/(gemma3?_decoder_block(?:_\d+)?)(?:/|$)")


def _check_decoder_block_count(backbone, paths, source):
    """Keras loads a file with more blocks than the config into the first
    ones without a word: a config and weights of different models."""
    blocks = {m.group(1) for m in map(_DECODER_BLOCK_PATH.match, paths) if m}
    if blocks and len(blocks) != backbone.num_layers:
        raise ValueError(
            f"{source} holds {len(blocks)} decoder blocks, but the preset's "
            f"config gives num_layers={backbone.num_layers}: its config and "
            "weights belong to different models. Download or save the "
            "preset again."
        )


def _mismatched_weights(source, error):
    return ValueError(
        f"The weights in {source} do not fit the model the preset's config "
        "describes: its config and weights belong to different models. "
        f"Download or save the preset again.\nKeras: {error}"
    )


def _h5_layer_paths(filepath):
    """The top-level layer groups of a Keras weights file (`layers/name`)."""
    import h5py

    try:
        with h5py.File(filepath, "r") as file:
            layers = file.get("layers")
            return [f"layers/{name}" for name in layers] if isinstance(layers, h5py.Group) else []
    except (OSError, KeyError) as e:  # KeyError: a damaged object header.
        raise _unreadable_weights(filepath, e) from e


def _gemma3_layer_paths(backbone):
    """`(layer, h5 group path)` for each of our layers with weights, at the
    path Keras gives it in a KerasHub `Gemma3Backbone`'s
    `model.weights.h5`."""
    yield backbone.token_embedding, "layers/reversible_embedding"
    for i, block in enumerate(backbone.transformer_layers):
        prefix = "layers/gemma3_decoder_block" + (f"_{i}" if i else "")
        attention = block.attention
        layers = {
            "pre_attention_norm": block.pre_attention_norm,
            "pre_ffw_norm": block.pre_ffw_norm,
            "gating_ffw": block.gating_ffw,
            "gating_ffw_2": block.gating_ffw_2,
            "ffw_linear": block.ffw_linear,
            "attention/query_dense": attention.query_dense,
            "attention/key_dense": attention.key_dense,
            "attention/value_dense": attention.value_dense,
            "attention/output_dense": attention.output_dense,
        }
        if block.use_sandwich_norms:
            layers["post_attention_norm"] = block.post_attention_norm
            layers["post_ffw_norm"] = block.post_ffw_norm
        if attention.use_query_key_norm:
            layers["attention/query_norm"] = attention.query_norm
            layers["attention/key_norm"] = attention.key_norm
        for name, layer in layers.items():
            yield layer, f"{prefix}/{name}"
    yield backbone.layer_norm, "layers/rms_normalization"


def _saved_variables(layer):
    """`{dataset name: variable}` in the order Keras saves `layer`'s
    variables (a quantized layer's scales after its kernel)."""
    store = {}
    layer.save_own_variables(store)
    return store


def load_keras_hub_gemma3_weights(backbone, filepaths, source):
    """Assign a built `GemmaBackbone` the weights of a KerasHub
    `Gemma3Backbone` saved in `filepaths` (`model.weights.h5`, or the
    shards Keras splits large models into), tensor by tensor. `source`
    names them in errors."""
    import h5py

    with contextlib.ExitStack() as stack:
        files = []
        for filepath in filepaths:
            try:
                files.append(stack.enter_context(h5py.File(filepath, "r")))
            except OSError as e:
                raise _unreadable_weights(filepath, e) from e
        for layer, group_path in _gemma3_layer_paths(backbone):
            variables = _saved_variables(layer)
            groups = (file.get(f"{group_path}/vars") for file in files)
            group = next((g for g in groups if isinstance(g, h5py.Group)), None)
            if group is not None and set(group) - set(variables):
                # A quantized preset's scales, say: left at zero, NaN logits.
                raise ValueError(
                    f"{source}: {group_path} holds {len(group)} weights, but this "
                    f"model's layer {layer.path} has {len(variables)}: the preset was "
                    "saved from a model of another configuration or quantization."
                )
            for key, variable in variables.items():
                _assign_dataset(variable, _dataset(files, f"{group_path}/vars/{key}", source))


def _dataset(files, path, source):
    import h5py

    datasets = (file.get(path) for file in files)
    dataset = next((d for d in datasets if isinstance(d, h5py.Dataset)), None)
    if dataset is None:
        raise ValueError(
            f"{source} has no dataset {path}: it is not the weights "
            "file of a KerasHub Gemma3Backbone with this config."
        )
    return dataset


def _assign_dataset(variable, dataset):
    import ml_dtypes
    import numpy as np

    from keras_gemma.layers.embedding import assign_by_row_blocks

    filepath = dataset.file.filename
    if dataset.shape != tuple(variable.shape):
        raise ValueError(
            f"{filepath}: {dataset.name.lstrip('/')} has shape {dataset.shape}, but the "
            f"config gives {variable.path} shape {tuple(variable.shape)}."
        )
    try:
        value = dataset[()]
    except OSError as e:
        raise _unreadable_weights(filepath, e) from e
    if dataset.attrs.get("dtype") == "bfloat16":
        value = np.asarray(value).view(ml_dtypes.bfloat16)
    assign_by_row_blocks(variable, value)


class GemmaPresetLoader(KerasPresetLoader):
    """KerasHub's preset loader, reading KerasHub Gemma presets as ours."""

    def __init__(self, preset, config):
        self.is_keras_hub_gemma3 = (
            config.get("registered_name") == KERAS_HUB_GEMMA3_BACKBONE
        )
        self.is_keras_hub = config.get("registered_name") in KERAS_HUB_CLASSES
        super().__init__(preset, translate_config(config))

    def load_backbone(self, cls, load_weights, **kwargs):
        kwargs["dtype"] = self._dtype(kwargs.get("dtype"))
        if not load_weights:
            return self._build_backbone(cls, **kwargs)
        from keras_gemma.models.deferred_variables import deferred_variables
        from keras_gemma.models.deferred_variables import initialize_for_loading

        # Not KerasHub's random initialization: the file replaces every value.
        # KerasHub quantizes int8 with Keras' default (activations too).
        quantization = keras_default_int8() if self.is_keras_hub else contextlib.nullcontext()
        with deferred_variables(), quantization:
            backbone = self._build_backbone(cls, **kwargs)
        initialize_for_loading(backbone)
        self._load_backbone_weights(backbone)
        return backbone

    def _build_backbone(self, cls, **kwargs):
        try:
            return super().load_backbone(cls, load_weights=False, **kwargs)
        except TypeError as e:  # Keras' wording blames our from_config().
            cause = str(e).rsplit("Exception encountered: ", 1)[-1]
            raise ValueError(
                f"{self.preset}/config.json does not describe a model "
                f"keras_gemma can build ({cause}): the preset is damaged or "
                "was edited by hand. Download or save it again."
            ) from e

    def _dtype(self, dtype):
        """The dtype to build with: the caller's, else the saved one.

        KerasHub's loader passes `dtype=None` over the saved value, which
        drops a quantized preset's per-layer policies (a `DTypePolicyMap`).
        """
        saved = self.config["config"].get("dtype")
        if not (isinstance(saved, dict) and saved.get("class_name") == "DTypePolicyMap"):
            return dtype
        if dtype is not None:
            raise ValueError(
                f"{self.preset} holds a quantized model, whose layers keep the "
                f"dtypes they were saved with; load it without dtype={dtype!r}."
            )
        return saved

    def _load_backbone_weights(self, backbone):
        single_file = preset_file_exists(self.preset, MODEL_WEIGHTS_FILE)
        if not single_file and not preset_file_exists(self.preset, SHARDED_MODEL_WEIGHTS_CONFIG_FILE):
            try:  # Offline without them in the cache: say so (see `loading.downloading`).
                get_file(self.preset, MODEL_WEIGHTS_FILE)
            except FileNotFoundError as e:
                if fetch_failure(e) is not None:
                    raise
            raise FileNotFoundError(
                f"{self.preset} has no weights file ({MODEL_WEIGHTS_FILE}, or "
                f"{SHARDED_MODEL_WEIGHTS_CONFIG_FILE} for sharded weights): the "
                "preset is incomplete. Save or download it again, or pass "
                "load_weights=False for random weights."
            )
        if not self.is_keras_hub_gemma3:
            # h5py's errors (OSError, or KeyError for a damaged object
            # header) do not name the file.
            if single_file:
                source = get_file(self.preset, MODEL_WEIGHTS_FILE)
                paths = _h5_layer_paths(source)
                load = lambda: backbone.load_weights(source)
            else:  # Sharded weights: KerasHub's loader.
                source = f"{self.preset}/{SHARDED_MODEL_WEIGHTS_CONFIG_FILE} (and its shards)"
                paths = self._weight_map().keys()
                load = lambda: super(GemmaPresetLoader, self)._load_backbone_weights(backbone)
            _check_decoder_block_count(backbone, paths, source)
            try:
                return load()
            except (OSError, KeyError) as e:
                raise _unreadable_weights(source, e) from e
            except ValueError as e:
                raise _mismatched_weights(source, e) from e
        if single_file:
            filepath = get_file(self.preset, MODEL_WEIGHTS_FILE)
            _check_decoder_block_count(backbone, _h5_layer_paths(filepath), filepath)
            load_keras_hub_gemma3_weights(backbone, [filepath], filepath)
        else:  # KerasHub shards presets over 10 GB (Gemma 3 12B and 27B).
            index = get_file(self.preset, SHARDED_MODEL_WEIGHTS_CONFIG_FILE)
            source = f"{index} (and its shards)"
            _check_decoder_block_count(backbone, self._weight_map().keys(), source)
            load_keras_hub_gemma3_weights(backbone, self._shard_files(), source)

    def _weight_map(self):
        """A sharded preset's `model.weights.json` map from each variable's
        path to its shard files."""
        config = read_preset_json(self.preset, SHARDED_MODEL_WEIGHTS_CONFIG_FILE)
        weight_map = config.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(
                f"{self.preset}/{SHARDED_MODEL_WEIGHTS_CONFIG_FILE} lists no "
                "weight files (weight_map); the preset is damaged. Download "
                "or save it again."
            )
        return weight_map

    def _shard_files(self):
        """The weight files a sharded preset's `model.weights.json` lists,
        each downloaded if the preset is remote."""
        names = set()
        for files in self._weight_map().values():
            names.update([files] if isinstance(files, str) else files)
        return [get_file(self.preset, name) for name in sorted(names)]

    def _load_serialized_object(self, config, **kwargs):
        return super()._load_serialized_object(translate_config(config), **kwargs)

    def load_tokenizer(self, cls, config_file=TOKENIZER_CONFIG_FILE, **kwargs):
        if not preset_file_exists(self.preset, config_file):
            raise FileNotFoundError(
                f"{self.preset} has no {config_file}: it holds no tokenizer "
                "(a backbone saved on its own?). Load the model without one, "
                "`GemmaCausalLM.from_preset(preset, preprocessor=None)`, to "
                "generate from token ids, or pass `preprocessor=` yourself."
            )
        tokenizer = self._load_serialized_object(
            read_serialized_object(self.preset, config_file), **kwargs
        )
        tokenizer.load_preset_assets(self.preset)
        return tokenizer

    def load_preprocessor(self, cls, config_file=PREPROCESSOR_CONFIG_FILE, **kwargs):
        if not preset_file_exists(self.preset, config_file):
            return PresetLoader.load_preprocessor(self, cls, **kwargs)
        preprocessor = self._load_serialized_object(
            read_serialized_object(self.preset, config_file), **kwargs
        )
        if not isinstance(preprocessor, cls):
            raise ValueError(
                f"{self.preset}/{config_file} holds a "
                f"{type(preprocessor).__name__}, not a {cls.__name__}."
            )
        try:
            preprocessor.load_preset_assets(self.preset)
        except FileNotFoundError as e:  # KerasHub's "... doesn't exist in preset directory".
            if fetch_failure(e) is not None:
                raise
            raise FileNotFoundError(
                f"{self.preset} is an incomplete preset: {e} Download or save it again, or "
                "load the model without its tokenizer (`preprocessor=None`)."
            ) from None
        return preprocessor

    def load_task(self, cls, load_weights, load_task_weights, **kwargs):
        # A causal LM is its backbone plus its preprocessor: build it from
        # their files rather than task.json (which may name KerasHub classes).
        return PresetLoader.load_task(
            self, cls, load_weights, load_task_weights, **kwargs
        )
