"""KerasHub-format preset directories: ours and the official KerasHub ones.

A preset written by `save_to_preset` (ours, `keras_gemma>...` classes) and one
written by KerasHub (`keras_hub>GemmaBackbone`, the Kaggle Keras format) share
the file layout and the weight names; only the class names and a few backbone
arguments differ. `translate_config` maps a KerasHub config tree onto ours, and
`GemmaPresetLoader` applies it to everything it reads, so one loading path
serves both.
"""

import copy

from keras_hub.src.utils.preset_utils import PREPROCESSOR_CONFIG_FILE
from keras_hub.src.utils.preset_utils import KerasPresetLoader
from keras_hub.src.utils.preset_utils import PresetLoader
from keras_hub.src.utils.preset_utils import check_file_exists
from keras_hub.src.utils.preset_utils import load_json

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


def backbone_kwargs_from_keras_hub(config):
    """Map a KerasHub `GemmaBackbone` config (Gemma 1 and 2) onto ours."""
    config = dict(config)
    num_layers = config["num_layers"]
    post_attention = config.pop("use_post_attention_norm", False)
    post_ffw = config.pop("use_post_ffw_norm", False)
    if post_attention != post_ffw:
        raise ValueError(
            "KerasHub Gemma config with use_post_attention_norm="
            f"{post_attention} but use_post_ffw_norm={post_ffw}: no Gemma "
            "release mixes these; keras_gemma supports both on or both off."
        )
    # KerasHub stores twice the width of each gate.
    config["intermediate_dim"] = config["intermediate_dim"] // 2
    # KerasHub's decoder block ignores this flag (Gemma 2 27B then gets the
    # wrong scale); we honour it: False means hidden_dim / num_query_heads.
    if not config.pop("query_head_dim_normalize", True):
        config["query_scale"] = config["hidden_dim"] // config["num_query_heads"]
    window = config.pop("sliding_window_size", None)
    if config.pop("use_sliding_window_attention", False):
        # Gemma 2: even layers slide, odd layers are global.
        config["sliding_window"] = window
        config["layer_types"] = [
            "sliding" if i % 2 == 0 else "global" for i in range(num_layers)
        ]
    config["use_sandwich_norms"] = post_attention
    return config


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
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(config)
    return config


class GemmaPresetLoader(KerasPresetLoader):
    """KerasHub's preset loader, reading KerasHub Gemma presets as ours."""

    def __init__(self, preset, config):
        super().__init__(preset, translate_config(config))

    def _load_serialized_object(self, config, **kwargs):
        return super()._load_serialized_object(translate_config(config), **kwargs)

    def load_preprocessor(self, cls, config_file=PREPROCESSOR_CONFIG_FILE, **kwargs):
        if not check_file_exists(self.preset, config_file):
            return PresetLoader.load_preprocessor(self, cls, **kwargs)
        preprocessor = self._load_serialized_object(
            load_json(self.preset, config_file), **kwargs
        )
        if not isinstance(preprocessor, cls):
            raise ValueError(
                f"{self.preset}/{config_file} holds a "
                f"{type(preprocessor).__name__}, not a {cls.__name__}."
            )
        preprocessor.load_preset_assets(self.preset)
        return preprocessor

    def load_task(self, cls, load_weights, load_task_weights, **kwargs):
        # A causal LM is its backbone plus its preprocessor: build it from
        # their files rather than task.json (which may name KerasHub classes).
        return PresetLoader.load_task(
            self, cls, load_weights, load_task_weights, **kwargs
        )
