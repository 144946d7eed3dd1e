"""The preset catalog (JSON files), shipped in the wheel as keras_gemma.presets.

Reading it imports no Keras: the command checks a preset's name before the
backend loads (seconds sooner for a typo).
"""

import difflib
import functools
import json
import os
import re
from importlib import resources

REMOTE_SCHEMES = ("kaggle://", "hf://")
_FILE_TYPES = (".gguf", ".ckpt", ".pt", ".pth", ".bin", ".safetensors")


@functools.cache
def catalog():
    """The catalog: `{name: entry}`."""
    entries = {}
    for path in sorted(resources.files(__name__).iterdir()):
        if path.name.endswith(".json"):
            entries.update(json.loads(path.read_text(encoding="utf-8")))
    return entries


def context_length(config):
    """The context length of the released models with this backbone config
    (their transformers configs' `max_position_embeddings`): 8192 for Gemma 1
    and 2; for Gemma 3 (query/key norms), 131072 where the global layers
    scale RoPE (4B, 12B, 27B) and 32768 where they do not (270M, 1B)."""
    if not config.get("use_query_key_norm"):
        return 8192
    return 32768 if config.get("rope_scaling_factor", 1.0) == 1 else 131072


# Web addresses of models, and the handles that name them.
_MODEL_PAGES = {
    r"^https?://(?:www\.)?huggingface\.co/([^/]+/[^/?#]+)": "hf://{}",
    r"^https?://(?:www\.)?kaggle\.com/models/([^?#]+?)/?(?:[?#]|$)": "kaggle://{}",
    r"^(?:hf|kaggle):/?(?!/)(.+)": None,  # A scheme with one slash or none.
}


def _handle_hint(preset):
    """A sentence suggesting the handle for a pasted web address or a
    handle with a misspelt scheme; "" for anything else."""
    for pattern, handle in _MODEL_PAGES.items():
        match = re.match(pattern, preset)
        if match:
            if handle is None:
                handle = preset.split(":", 1)[0] + "://{}"
            return f" For that model pass {handle.format(match.group(1).lstrip('/'))!r}."
    return ""


def check_preset(preset):
    """Refuse a `preset` that is neither a catalog name, nor an existing
    path (`~` expanded), nor a kaggle:// or hf:// handle, naming the close
    catalog names."""
    if preset in catalog() or preset.startswith(REMOTE_SCHEMES) or os.path.exists(os.path.expanduser(preset)):
        return
    hint = _handle_hint(preset)
    if hint:
        raise ValueError(f"Unknown preset {preset!r}: it is not a handle keras_gemma reads.{hint}")
    if "/" in preset or os.sep in preset or preset.startswith((".", "~")) or preset.endswith(_FILE_TYPES):
        hub = (
            f" For a model on the Hugging Face Hub, pass 'hf://{preset}'."
            if preset.count("/") == 1 and not preset.startswith((".", "/", "~")) else ""
        )
        raise ValueError(f"Unknown preset {preset!r}: no such file or directory.{hub}")
    close = difflib.get_close_matches(preset, catalog(), n=3)
    suggestion = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise ValueError(
        f"Unknown preset {preset!r}: it is neither a catalog name nor an "
        f"existing path nor a kaggle:// or hf:// handle.{suggestion} Catalog "
        f"names: {', '.join(sorted(catalog()))}."
    )
