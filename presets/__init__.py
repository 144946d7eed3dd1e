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
# Single-file checkpoints keras_gemma reads: GGUF, and gemma_pytorch's
# (PyTorch's pickle-free `weights_only` loading).
GEMMA_PYTORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
CHECKPOINT_FILE_SUFFIXES = (".gguf", *GEMMA_PYTORCH_SUFFIXES)


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


def _handle_hint(preset):
    """A sentence saying what to pass instead of a pasted web address or a
    handle with a misspelt scheme; "" for anything else."""
    hub_file = re.match(r"^https?://(?:www\.)?huggingface\.co/([^/]+/[^/]+)/(?:resolve|blob)/[^/]+/([^?#]+)", preset)
    if hub_file:  # One file (a GGUF, say): a repo handle would want config.json.
        repo, path = hub_file.groups()
        return f" For that file, download it (`hf download {repo} {path}`) and pass its local path."
    hub = re.match(r"^https?://(?:www\.)?huggingface\.co/([^/]+/[^/?#]+)", preset)
    if hub:
        return f" For that model pass {'hf://' + hub.group(1)!r}."
    kaggle = re.match(r"^https?://(?:www\.)?kaggle\.com/models/([^?#]+?)/?(?:[?#]|$)", preset)
    if kaggle:
        path = kaggle.group(1)
        if path.count("/") < 3:  # A model's page: the handle names a variation.
            return (
                " A Kaggle handle names a variation: kaggle://OWNER/MODEL/FRAMEWORK/VARIATION "
                "(e.g. kaggle://keras/gemma3/keras/gemma3_1b), as the model page's variations list them."
            )
        return f" For that model pass {'kaggle://' + path!r}."
    scheme = re.match(r"^(hf|kaggle):/?(?!/)(.+)", preset)  # One slash or none.
    if scheme:
        return f" For that model pass {scheme.group(1) + '://' + scheme.group(2).lstrip('/')!r}."
    return ""


def check_preset(preset):
    """Refuse a `preset` that is neither a catalog name, nor an existing
    path (`~` expanded), nor a kaggle:// or hf:// handle, naming the close
    catalog names."""
    if preset in catalog() or preset.startswith(REMOTE_SCHEMES) or os.path.exists(os.path.expanduser(preset)):
        return
    if preset.rstrip("/" + os.sep) in catalog():
        raise ValueError(
            f"Unknown preset {preset!r}: no such directory. For the catalog model, pass "
            f"{preset.rstrip('/' + os.sep)!r}."
        )
    hint = _handle_hint(preset)
    if hint:
        raise ValueError(f"Unknown preset {preset!r}: it is not a handle keras_gemma reads.{hint}")
    if "/" in preset or os.sep in preset or preset.startswith((".", "~")) or preset.lower().endswith((*CHECKPOINT_FILE_SUFFIXES, ".safetensors")):
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
