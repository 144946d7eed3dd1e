"""GGUF files (llama.cpp / ollama) for the gemma, gemma2 and gemma3 architectures.

Tensors are dequantized one at a time with the `gguf` package into the HF
`[out, in]` layout and renamed to HF names, so the shared weight path
(`hf.load_hf_weights`) assigns them. Two quirks of llama.cpp's converter are
undone here: norm weights are stored as `w + 1`, and the metadata omits what
it considers defaults (Gemma 3's local RoPE base and 5:1 layer pattern, the
27B query scale, Gemma 3's x8 global RoPE scaling): those come from the
matching catalog entry, or from the family's defaults for unknown sizes.
The SentencePiece tokenizer is rebuilt from the file's vocabulary.
"""

import os
import re

import numpy as np

from keras_gemma.checkpoints.gguf_reader import GGUFFile
from keras_gemma.checkpoints.importer import ImportedCheckpoint
from keras_gemma.checkpoints.sentencepiece_model import gemma_model_proto
from keras_gemma.checkpoints.sentencepiece_model import is_gemma_user_defined
from keras_gemma.presets import catalog

ARCHITECTURES = ("gemma", "gemma2", "gemma3")

# GGUF tensor name suffix -> HF name suffix, per architecture.
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GEMMA1_NORMS = {"ffn_norm.weight": "post_attention_layernorm.weight"}
_SANDWICH_NORMS = {
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
# Family defaults for what the metadata leaves out (sizes not in the catalog).
_FAMILY_DEFAULTS = {
    "gemma": {},
    "gemma2": {"use_sandwich_norms": True, "sliding_pattern": "even"},
    "gemma3": {
        "use_sandwich_norms": True,
        "use_query_key_norm": True,
        "sliding_pattern": 6,
        "local_rope_max_wavelength": 10000.0,
    },
}
# 0 is llama.cpp's "undefined": an ordinary piece.
_GGUF_TOKEN_TYPES = {0: "NORMAL", 1: "NORMAL", 2: "UNKNOWN", 3: "CONTROL", 4: "USER_DEFINED", 5: "UNUSED", 6: "BYTE"}


def _hf_name(gguf_name, architecture):
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    if not gguf_name.startswith("blk."):
        return None
    _, index, suffix = gguf_name.split(".", 2)
    names = {**_LAYER_NAMES, **(_GEMMA1_NORMS if architecture == "gemma" else _SANDWICH_NORMS)}
    if suffix not in names:
        return None
    return f"model.layers.{index}.{names[suffix]}"


# GGML type ids of llama.cpp's removed ARM-repacked types: no gguf release
# names them.
_REMOVED_REPACKED_TYPES = {31, 32, 33, 36, 37, 38}


def _open(path):
    try:
        return GGUFFile(path)
    except Exception as e:  # A damaged file: assorted errors.
        found = re.search(r"(\d+)\)? is not a valid GGMLQuantizationType", str(e))
        if found and int(found.group(1)) in _REMOVED_REPACKED_TYPES:
            raise ValueError(
                f"{path} uses tensor type {found.group(1)}, one of the ARM-repacked "
                "types (Q4_0_4_4, Q4_0_4_8, Q4_0_8_8, IQ4_NL_4_4/4_8/8_8) that "
                "llama.cpp has removed from GGUF files (it repacks at load time "
                "now). Use a Q4_0, Q8_0 or K-quant file of the model instead."
            ) from e
        if found:
            raise ValueError(
                f"{path} uses a tensor type that the installed gguf package does "
                f"not know ({e}): upgrade it (pip install -U gguf)."
            ) from e
        raise ValueError(
            f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); "
            "it may be truncated or corrupt. Download it again."
        ) from e


def _field(reader, key, default=None):
    return reader.fields.get(key, default)


def _number(reader, key, path, kind, default=None):
    """Metadata `key` as `kind` (int: a count >= 1, or float), `default`
    where absent (None stays None). Another value, as in a damaged file, is
    an error naming the key rather than a TypeError or ZeroDivisionError later."""
    value = _field(reader, key, default)
    if value is None:
        return None
    allowed = (int, float) if kind is float else int
    if not isinstance(value, allowed) or isinstance(value, bool) or (kind is int and value < 1):
        what = "a whole number >= 1" if kind is int else "a number"
        raise ValueError(f"{path}: metadata {key} is {value!r}, not {what}; the file is damaged.")
    return kind(value)


def _layer_types(pattern, num_layers):
    """Per-layer types from a pattern: "even" (Gemma 2: even layers slide),
    an int n (layer i is global when (i + 1) % n == 0), or a per-layer list
    of booleans, True = sliding (newer llama.cpp files)."""
    if pattern == "even":
        return ["sliding" if i % 2 == 0 else "global" for i in range(num_layers)]
    if isinstance(pattern, (list, tuple)):
        return ["sliding" if sliding else "global" for sliding in pattern]
    return ["global" if (i + 1) % pattern == 0 else "sliding" for i in range(num_layers)]


def backbone_kwargs(reader, path):
    architecture = _field(reader, "general.architecture")
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"{path}: unknown architecture {architecture!r}; keras_gemma "
            f"reads GGUF files of {', '.join(ARCHITECTURES)}."
        )

    def meta(key, default=None):
        return _field(reader, f"{architecture}.{key}", default)

    def meta_int(key, default=None):
        return _number(reader, f"{architecture}.{key}", path, int, default)

    def meta_float(key, default=None):
        return _number(reader, f"{architecture}.{key}", path, float, default)

    required = ("embedding_length", "attention.head_count", "block_count", "feed_forward_length")
    missing = [f"{architecture}.{key}" for key in required if meta(key) is None]
    if architecture != "gemma" and meta("attention.sliding_window") is None:
        missing.append(f"{architecture}.attention.sliding_window")
    scaling = meta("rope.scaling.type")
    if scaling == "linear" and meta("rope.scaling.factor") is None:
        missing.append(f"{architecture}.rope.scaling.factor")
    if missing:
        raise ValueError(f"{path} lacks the metadata {', '.join(missing)}: it is not a complete model file.")
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is None:
        raise ValueError(f"{path} has no tensor 'token_embd.weight': it is not a complete model file.")
    if scaling not in (None, "none", "linear"):  # As the Hugging Face reader refuses them.
        raise ValueError(
            f"{path}: unsupported RoPE scaling {architecture}.rope.scaling.type="
            f"{scaling!r}; keras_gemma reads linear scaling only (Gemma 3's)."
        )
    hidden_dim = meta_int("embedding_length")
    num_heads = meta_int("attention.head_count")
    kwargs = dict(
        vocabulary_size=int(embedding.shape[-1]),
        num_layers=meta_int("block_count"),
        num_query_heads=num_heads,
        num_key_value_heads=meta_int("attention.head_count_kv", num_heads),
        hidden_dim=hidden_dim,
        intermediate_dim=meta_int("feed_forward_length"),
        head_dim=meta_int("attention.key_length", hidden_dim // num_heads),
        layer_norm_epsilon=meta_float("attention.layer_norm_rms_epsilon", 1e-6),
        rope_max_wavelength=meta_float("rope.freq_base", 10000.0),
    )
    if architecture != "gemma":
        # Gemma 2's soft-caps, where the file omits them: llama.cpp's
        # defaults (and transformers'), 50 and 30. Gemma 3 has none.
        gemma2 = architecture == "gemma2"
        kwargs.update(
            sliding_window=meta_int("attention.sliding_window"),
            attention_logit_soft_cap=meta_float("attn_logit_softcapping", 50.0 if gemma2 else None),
            final_logit_soft_cap=meta_float("final_logit_softcapping", 30.0 if gemma2 else None),
        )
    if scaling == "linear":
        kwargs["rope_scaling_factor"] = meta_float("rope.scaling.factor")
    defaults = dict(_FAMILY_DEFAULTS[architecture])
    default_pattern = defaults.pop("sliding_pattern", None)
    pattern = meta("attention.sliding_window_pattern")
    if pattern is None:
        pattern = default_pattern
    elif not isinstance(pattern, list):  # A period: every pattern-th layer is global.
        pattern = meta_int("attention.sliding_window_pattern")
    if pattern is not None:
        kwargs["layer_types"] = _layer_types(pattern, kwargs["num_layers"])
    kwargs.update(defaults)
    # What the metadata omits, from the catalog entry of this shape; the
    # file's own metadata wins where it has the key.
    filled = _catalog_fill(architecture, kwargs)
    if f"{architecture}.attention.sliding_window_pattern" in reader.fields:
        filled.pop("layer_types", None)
    if f"{architecture}.rope.scaling.type" in reader.fields:
        filled.pop("rope_scaling_factor", None)
    kwargs.update(filled)
    return kwargs


def _catalog_fill(architecture, kwargs):
    """What the metadata omits, from the catalog entry of the same shape."""
    keys = ("hidden_dim", "num_layers", "num_query_heads", "head_dim")
    for entry in catalog().values():
        config = entry["config"]
        if entry.get("family", "gemma") == architecture and all(
            config.get(k) == kwargs[k] for k in keys
        ):
            fill = ("query_scale", "rope_scaling_factor", "local_rope_max_wavelength", "layer_types")
            return {k: config[k] for k in fill if k in config}
    return {}


def tokenizer_proto(reader, path):
    """A SentencePiece model proto rebuilt from the GGUF vocabulary."""
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if tokens is None:
        raise ValueError(f"{path} has no tokenizer.ggml.tokens; it carries no tokenizer.")
    scores = _field(reader, "tokenizer.ggml.scores")
    types = _field(reader, "tokenizer.ggml.token_type")
    for key, values, kind, name in (
        ("tokens", tokens, str, "strings"), ("scores", scores, (int, float), "numbers"),
        ("token_type", types, int, "integers"),
    ):
        if not isinstance(values, list) or not all(isinstance(value, kind) for value in values):
            raise ValueError(f"{path}: tokenizer.ggml.{key} is missing or not an array of {name}; the file is damaged.")
        if len(values) != len(tokens):
            raise ValueError(
                f"{path}: tokenizer.ggml.{key} does not have one entry per "
                f"token ({len(tokens)}); the file's tokenizer is incomplete."
            )
    unknown_types = sorted({int(t) for t in types} - set(_GGUF_TOKEN_TYPES))
    if unknown_types:
        raise ValueError(f"{path}: unknown token types {unknown_types} in tokenizer.ggml.token_type.")
    pieces = []
    for token, score, token_type in zip(tokens, scores, types):
        # llama.cpp stores multi-space pieces with plain spaces.
        if len(token) > 1 and not token.strip(" "):
            token = "\u2581" * len(token)
        type_name = _GGUF_TOKEN_TYPES[int(token_type)]
        if token == "<unk>":  # Typed control in the file.
            type_name = "UNKNOWN"
        elif is_gemma_user_defined(token):
            type_name = "USER_DEFINED"
        pieces.append((token, score, type_name))
    return gemma_model_proto(pieces, path)


def _split_parts(reader, path):
    """The files of a GGUF split by llama.cpp's gguf-split (metadata in the
    first, `name-00001-of-0000N.gguf`), in order; `[path]` for one file."""
    count = _number(reader, "split.count", path, int, 1)
    if count <= 1:
        return [path]
    match = re.fullmatch(r"(.*)-(\d{5})-of-(\d{5})\.gguf", path)
    if not match or int(match[2]) != 1 or int(match[3]) != count:
        raise ValueError(
            f"{path} is one part of a GGUF split into {count} files: load the "
            f"first part, named like model-00001-of-{count:05d}.gguf, with the "
            "others beside it."
        )
    parts = [f"{match[1]}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]
    missing = [part for part in parts if not os.path.isfile(part)]
    if missing:
        raise FileNotFoundError(
            f"{path} is the first of {count} parts of a split GGUF, and "
            f"{', '.join(map(os.path.basename, missing))} is not beside it: "
            "download every part into the same directory."
        )
    return parts


def read_checkpoint(path):
    import gguf

    path = os.fspath(path)
    reader = _open(path)
    readers = [reader] + [_open(part) for part in _split_parts(reader, path)[1:]]
    kwargs = backbone_kwargs(reader, path)
    architecture = _field(reader, "general.architecture")
    tensors = {}
    for tensor in (tensor for part in readers for tensor in part.tensors):
        name = _hf_name(tensor.name, architecture)
        if name is not None:
            tensors[name] = tensor
    read_names = set()

    def get_tensor(name):
        tensor = tensors[name]
        read_names.add(tensor.name)
        data = tensor.data
        if not data.dtype.isnative:  # A big-endian file's F32/F16 (the gguf
            # package reinterprets its bytes in this machine's order: NaNs).
            data = data.astype(data.dtype.newbyteorder("="))
        try:
            array = gguf.quants.dequantize(data, tensor.tensor_type)
        except NotImplementedError as e:
            raise ValueError(
                f"{path}: tensor {tensor.name!r} uses quantization "
                f"{tensor.tensor_type.name}, which the gguf package cannot "
                "dequantize. Convert the file to another type (e.g. Q8_0)."
            ) from e
        array = np.asarray(array, dtype="float32")
        if name.endswith("norm.weight"):
            array = array - 1.0  # Stored as w + 1 by llama.cpp's converter.
        return array

    finetune = str(_field(reader, "general.finetune", "") or "").lower()
    name = str(_field(reader, "general.name", "") or "").lower()
    instruction_tuned = finetune in ("it", "instruct") or name.endswith((" it", "-it"))
    return ImportedCheckpoint(
        source=path,
        backbone_kwargs=kwargs,
        get_tensor=get_tensor,
        read_tokenizer=lambda: (
            tokenizer_proto(reader, path),
            ("<eos>", "<end_of_turn>") if instruction_tuned else ("<eos>",),
        ),
        stored_names=frozenset(tensor.name for part in readers for tensor in part.tensors),
        read_names=read_names,
    )
