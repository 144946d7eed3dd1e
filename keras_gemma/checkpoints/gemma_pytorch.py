"""gemma_pytorch checkpoints: the `.ckpt` files of Google's reference PyTorch
implementation (github.com/google/gemma_pytorch).

The file is a `torch.save` pickle of `{"model_state_dict": ...}`. It is read
with `torch.load(weights_only=True)`, which accepts tensors and plain
containers only, so no code from the file runs. Tensor names are HF's, except:

- `embedder.weight` is HF's `model.embed_tokens.weight` (`text_token_embedder`
  in Gemma 3 multimodal files, whose vision tower is skipped);
- each layer has one fused `self_attn.qkv_proj.weight` `[(N + 2K) * H, D]`:
  the N query heads, then the K key heads, then the K value heads;
- Gemma 3's query/key norms are `self_attn.query_norm` / `self_attn.key_norm`;
- int8 files store each matrix as int8 plus a per-row `weight_scaler`
  (the real weight is `weight * weight_scaler[:, None]`).

The file holds no configuration: it comes from the `config` argument (an HF
config dict), an HF `config.json` next to the file, or the catalog entry
whose shapes match. The tokenizer is the `tokenizer.model` next to the file.
"""

import functools
import json
import os
import pickle
import re

import numpy as np

from keras_gemma.checkpoints import hf
from keras_gemma.checkpoints.importer import ImportedCheckpoint
from keras_gemma.presets import catalog

# Gemma 3 multimodal files (Gemma3ForMultimodalLM, 4B and up) name the
# embedder so and add a vision tower, which is not read.
_MULTIMODAL_EMBEDDER = "text_token_embedder."
_VISION_PREFIXES = ("siglip_vision_model.", "mm_soft_embedding_norm.", "mm_input_projection.")
_QKV = re.compile(r"(model\.layers\.\d+\.self_attn\.)([qkv])_proj\.weight")
_RENAMED = {  # HF name part -> gemma_pytorch name part.
    "model.embed_tokens.weight": "embedder.weight",
    "self_attn.q_norm.": "self_attn.query_norm.",
    "self_attn.k_norm.": "self_attn.key_norm.",
}


def read_checkpoint(path, config=None):
    """An `ImportedCheckpoint` for a gemma_pytorch `.ckpt` file.

    `config`: the model's Hugging Face config dict; by default the
    `config.json` next to the file, else the catalog entry whose vocabulary
    size, width and depth match the tensors.
    """
    directory = os.path.dirname(os.path.abspath(path))
    state = _load_state_dict(path)
    backbone_kwargs = _backbone_kwargs(path, state, config)
    read_names = set()
    return ImportedCheckpoint(
        source=path,
        backbone_kwargs=backbone_kwargs,
        get_tensor=_hf_tensor_reader(path, state, backbone_kwargs, read_names),
        read_tokenizer=lambda: hf.read_tokenizer(directory),
        # Rotary tables (freqs_cis, Gemma 3's local_/global_freqs_cis) are buffers.
        stored_names=frozenset(name for name in state if "freqs_cis" not in name),
        read_names=read_names,
    )


def _torch_load(torch, path):
    """Tensors only (`weights_only`), paged in when read (`mmap`), except
    in files of torch's legacy format, which cannot be memory-mapped."""
    with open(path, "rb") as f:
        start = f.read(2)
    # A zip archive, or a legacy file's pickle protocol marker; else (an
    # HTML error page) torch's message is about unpickling code.
    if not (start.startswith(b"PK") or start.startswith(b"\x80")):
        raise ValueError("neither a zip archive nor a pickle: a web page saved in its place?")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
    return torch.load(path, map_location="cpu", weights_only=True)


def _load_state_dict(path):
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"Reading the gemma_pytorch checkpoint {path} needs PyTorch: "
            "pip install torch."
        ) from None
    try:
        checkpoint = _torch_load(torch, path)
    except pickle.UnpicklingError as e:
        # Only the object torch names: its message also suggests loading
        # with weights_only=False, which would run the file's code.
        found = re.search(r"unsupported global:?\s+(?:GLOBAL\s+)?(\w+(?:\.\w+)*)", str(e), re.IGNORECASE)
        detail = f"it names {found.group(1)}" if found else "objects torch will not unpickle"
        raise ValueError(
            f"{path} holds Python objects other than tensors ({detail}). "
            "keras_gemma refuses to execute code from checkpoint files; a "
            "gemma_pytorch checkpoint holds tensors only."
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise ValueError(
            f"{path} is not a readable PyTorch checkpoint ({e}); it may be truncated or "
            "corrupt: download it again."
        ) from None
    state = checkpoint.get("model_state_dict") if isinstance(checkpoint, dict) else None
    if isinstance(state, dict):
        state = {
            name.replace(_MULTIMODAL_EMBEDDER, "embedder.", 1): tensor
            for name, tensor in state.items()
            if not name.startswith(_VISION_PREFIXES)
        }
    if not isinstance(state, dict) or "embedder.weight" not in state:
        raise ValueError(
            f"{path} is not a gemma_pytorch Gemma checkpoint: it has no "
            "'model_state_dict' with an 'embedder.weight'."
        )
    for name, value in state.items():  # (Else an AttributeError when read.)
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"{path}: model_state_dict entry {name!r} is not a tensor "
                f"({type(value).__name__}); the file is damaged."
            )
    return state


def _backbone_kwargs(path, state, config):
    if config is not None:
        return hf.backbone_kwargs_from_config(config, "the config argument")
    config_path = os.path.join(os.path.dirname(os.path.abspath(path)), hf.CONFIG_FILE)
    if os.path.isfile(config_path):
        return hf.backbone_kwargs_from_config(hf.read_json(config_path), config_path)
    return _catalog_config(path, state)


def _catalog_config(path, state):
    """The config of the catalog entries whose shapes match the tensors."""
    vocabulary_size, hidden_dim = state["embedder.weight"].shape
    layers = {int(name.split(".")[2]) for name in state if name.startswith("model.layers.")}
    shapes = (vocabulary_size, hidden_dim, len(layers))
    matches = {}
    for name, entry in catalog().items():
        config = entry.get("config") or {}
        keys = ("vocabulary_size", "hidden_dim", "num_layers")
        if tuple(config.get(key) for key in keys) == shapes:
            matches[name] = config
    configs = {json.dumps(c, sort_keys=True) for c in matches.values()}
    if len(configs) == 1:
        return dict(next(iter(matches.values())))
    found = (
        f"catalog entries {sorted(matches)} match but differ"
        if matches
        else "no catalog entry matches"
    )
    raise ValueError(
        f"{path}: cannot tell the model's configuration (vocabulary "
        f"{vocabulary_size}, width {hidden_dim}, {len(layers)} layers; "
        f"{found}). Put the model's Hugging Face config.json next to the "
        "checkpoint file, or pass `config=` to read_checkpoint."
    )


def _hf_tensor_reader(path, state, backbone_kwargs, read_names):
    """`get_tensor(hf_name)`: the float numpy array HF would store; the
    names read from `state` are added to `read_names`."""
    N = backbone_kwargs["num_query_heads"]
    K = backbone_kwargs["num_key_value_heads"]
    H = backbone_kwargs["head_dim"]

    def weight(name):
        if name not in state:
            raise KeyError(name)
        tensor = state[name]
        read_names.add(name)
        if tensor.dtype.is_floating_point:
            return tensor.float().numpy()
        scaler = state.get(name + "_scaler")
        if scaler is None:
            raise ValueError(f"{path}: {name} is {tensor.dtype} but has no {name}_scaler.")
        read_names.add(name + "_scaler")
        return (tensor.float() * scaler.float()[:, None]).numpy()

    @functools.lru_cache(maxsize=1)  # q, k and v are read in a row.
    def qkv(prefix):
        name = prefix + "qkv_proj.weight"
        fused = weight(name)
        sizes = (N * H, K * H, K * H)
        if fused.shape[0] != sum(sizes):
            raise ValueError(
                f"{path}: {name} has {fused.shape[0]} rows; {N} query and {K} "
                f"key/value heads of width {H} need {sum(sizes)}. Is the "
                "config right for these weights?"
            )
        q, k, v = np.split(fused, [N * H, (N + K) * H])
        return {"q": q, "k": k, "v": v}

    def get_tensor(name):
        fused = _QKV.fullmatch(name)
        if fused:
            return qkv(fused.group(1))[fused.group(2)]
        for theirs, ours in _RENAMED.items():
            name = name.replace(theirs, ours)
        return weight(name)

    return get_tensor
