"""Hugging Face transformers Gemma checkpoints: config and weight mapping,
reading a checkpoint directory and exporting one.

HF stores PyTorch `[out, in]` matrices; our EinsumDense kernels are
`[heads, D, head_dim]` for q/k/v, `[heads, head_dim, D]` for the output and
`[in, out]` for the feed-forward layers.

A checkpoint directory holds `config.json`, `model.safetensors` (or shards
listed in `model.safetensors.index.json`), `tokenizer.model` or
`tokenizer.json` (or both) and optionally `generation_config.json`. Pickle weight files (`pytorch_model.bin`) are
refused: unpickling can run code from the file.
"""

import json
import math
import os
import warnings

import ml_dtypes  # Registers bfloat16 with numpy (safetensors' numpy reader uses it).
import numpy as np

from keras_gemma.presets import context_length
from keras_gemma.staging import staged_directory

MODEL_TYPES = ("gemma", "gemma2", "gemma3_text")
_LAYER_TYPES = {"sliding_attention": "sliding", "full_attention": "global"}
_ARCHITECTURES = {
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
# transformers fills the keys a config.json omits from its config class's
# defaults, and files rely on it: the multimodal Gemma 3 files' text_config
# leaves out the vocabulary, the heads and the RoPE bases; Gemma 2 files may
# leave out the soft-caps. These are `GemmaConfig`'s, `Gemma2Config`'s and
# `Gemma3TextConfig`'s defaults for the keys the weights' shapes do not show
# (and the vocabulary and heads, which they do).
_HF_CONFIG_DEFAULTS = {
    "gemma": dict(
        vocab_size=256000, num_attention_heads=16, num_key_value_heads=16,
        head_dim=256, rope_theta=10_000.0, rms_norm_eps=1e-6,
    ),
    "gemma2": dict(
        vocab_size=256000, num_attention_heads=8, num_key_value_heads=4,
        head_dim=256, query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0, sliding_window=4096, rope_theta=10_000.0,
        rms_norm_eps=1e-6,
    ),
    "gemma3_text": dict(
        vocab_size=262208, num_attention_heads=8, num_key_value_heads=4,
        head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
        rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, rms_norm_eps=1e-6,
    ),
}

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.model"
TOKENIZER_JSON_FILE = "tokenizer.json"  # Hugging Face `tokenizers`' format.
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# Exported as special tokens (transformers' decode can skip them).
_SPECIAL_NAMES = ("pad", "eos", "bos", "unk", "mask", "start_of_turn", "end_of_turn")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Multimodal Gemma 3 files: the text model's tensors sit under one of these
# prefixes (older and newer transformers), mapped back to the causal-LM names.
_TEXT_MODEL_PREFIXES = {"language_model.": "", "model.language_model.": "model."}
_VISION_PREFIXES = (
    "vision_tower.", "multi_modal_projector.",
    "model.vision_tower.", "model.multi_modal_projector.",
)


def _rope(config):
    """`(global theta, local theta, global linear scaling factor)` from either
    the per-layer-type `rope_parameters` (transformers 5) or the older
    `rope_theta` / `rope_local_base_freq` / `rope_scaling` keys. Scalings
    other than Gemma 3's (linear, global layers only) are refused."""
    params = _get(config, "rope_parameters", dict, {})
    if "full_attention" in params or "sliding_attention" in params:
        full = _get(params, "full_attention", dict, {})
        sliding = _get(params, "sliding_attention", dict, {})
    else:
        full = dict(params)
        sliding = {}
    global_theta = _get(full, "rope_theta", float, _get(config, "rope_theta", float, 10000.0))
    local_theta = _get(sliding, "rope_theta", float, _get(config, "rope_local_base_freq", float, global_theta))
    if _rope_type(sliding) != "default":
        raise ValueError(f"Unsupported RoPE scaling of the sliding layers {sliding}; keras_gemma scales global layers only.")
    scaling = full if _rope_type(full) != "default" else _get(config, "rope_scaling", dict, {})
    factor = 1.0
    if _rope_type(scaling) == "linear":
        factor = float(_get(scaling, "factor", float))
    elif _rope_type(scaling) != "default":
        raise ValueError(f"Unsupported RoPE scaling {scaling}; only linear is.")
    return float(global_theta), float(local_theta), factor


def _rope_type(params):
    return params.get("rope_type", params.get("type")) or "default"


_REQUIRED = object()
# JSON types of config values, and how errors name them.
_KINDS = {
    int: (int, "a whole number >= 1"),
    float: ((int, float), "a number"),
    dict: (dict, "a JSON object"),
    list: (list, "a list"),
}


def _get(config, key, kind, default=_REQUIRED):
    """`config[key]` checked to be of `kind` (int: a count >= 1), or
    `default` where it is absent or null. Another value (a damaged file) is
    a ValueError naming the key, not a TypeError or ZeroDivisionError later."""
    value = config.get(key)
    if value is None and default is not _REQUIRED:
        return default
    if key not in config:
        raise KeyError(key)
    types, description = _KINDS[kind]
    if not isinstance(value, types) or isinstance(value, bool) or (kind is int and value < 1):
        raise ValueError(f"{key} is {value!r}, not {description}.")
    return value


def backbone_kwargs_from_hf_config(config):
    """`GemmaBackbone` arguments from an HF `config.json` dict."""
    model_type = config.get("model_type")
    if config.get("quantization_config"):
        method = _get(config, "quantization_config", dict).get("quant_method", "quantized")
        raise ValueError(
            f"The checkpoint is quantized ({method}); keras_gemma reads float "
            "checkpoints. Use the model's float16/bfloat16/float32 release (and "
            "`quantize('int8')` after loading for int8)."
        )
    if model_type == "gemma3":  # Multimodal wrapper: the text part.
        config, model_type = _get(config, "text_config", dict), "gemma3_text"
    if config.get("tie_word_embeddings") is False:
        raise ValueError(
            "The checkpoint has an output head of its own (tie_word_embeddings: "
            "false); Gemma's reuses the embedding, and keras_gemma supports "
            "only that."
        )
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"Unknown architecture model_type={model_type!r}; keras_gemma "
            f"reads {', '.join(MODEL_TYPES)} (and gemma3's text model)."
        )
    if config.get("use_bidirectional_attention"):
        raise ValueError(
            "The checkpoint attends in both directions (use_bidirectional_"
            "attention: true, as EmbeddingGemma does): it is an embedding "
            "model, not a causal language model, and keras_gemma does not "
            "support it."
        )
    config = {**_HF_CONFIG_DEFAULTS[model_type], **config}
    num_layers = _get(config, "num_hidden_layers", int)
    num_heads = _get(config, "num_attention_heads", int)
    hidden_dim = _get(config, "hidden_size", int)
    global_theta, local_theta, scaling_factor = _rope(config)
    kwargs = dict(
        vocabulary_size=_get(config, "vocab_size", int),
        num_layers=num_layers,
        num_query_heads=num_heads,
        num_key_value_heads=_get(config, "num_key_value_heads", int),
        hidden_dim=hidden_dim,
        intermediate_dim=_get(config, "intermediate_size", int),
        head_dim=_get(config, "head_dim", int, hidden_dim // num_heads),
        layer_norm_epsilon=_get(config, "rms_norm_eps", float, 1e-6),
        rope_max_wavelength=global_theta,
    )
    if model_type != "gemma3_text" and scaling_factor != 1:
        # transformers would scale every layer; ours scales global layers.
        raise ValueError(f"Unsupported RoPE scaling in a {model_type} checkpoint; only Gemma 3's is.")
    if model_type == "gemma":
        return kwargs
    layer_types = _get(config, "layer_types", list, None)
    if layer_types is None:
        if model_type == "gemma2":
            layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention"
                           for i in range(num_layers)]
        else:
            pattern = _get(config, "sliding_window_pattern", int, 6)
            layer_types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                           for i in range(num_layers)]
    unknown = sorted({repr(t) for t in layer_types if not (isinstance(t, str) and t in _LAYER_TYPES)})
    if unknown:
        raise ValueError(
            f"layer_types has {', '.join(unknown)}, which keras_gemma "
            f"does not support (only {', '.join(map(repr, _LAYER_TYPES))})."
        )
    attention_soft_cap = _get(config, "attn_logit_softcapping", float, None)
    if model_type == "gemma3_text" and attention_soft_cap is not None:
        # transformers' Gemma 3 reads the key and never applies it: a model
        # that did would compute other logits than the checkpoint's own.
        warnings.warn(
            f"config.json sets attn_logit_softcapping={attention_soft_cap} for "
            "gemma3_text, which transformers ignores (Gemma 3 has no attention "
            "soft-cap); ignored here too.",
            stacklevel=2,
        )
        attention_soft_cap = None
    kwargs.update(
        query_scale=_get(config, "query_pre_attn_scalar", float, None),
        attention_logit_soft_cap=attention_soft_cap,
        final_logit_soft_cap=_get(config, "final_logit_softcapping", float, None),
        # A window no layer uses (see `hf_config_from_backbone_config`) is none.
        sliding_window=_get(config, "sliding_window", int, None) if "sliding_attention" in layer_types else None,
        layer_types=[_LAYER_TYPES[t] for t in layer_types],
        use_sandwich_norms=True,
        use_query_key_norm=model_type == "gemma3_text",
        local_rope_max_wavelength=local_theta,
        rope_scaling_factor=scaling_factor,
    )
    return kwargs


def hf_weight_names(backbone):
    """`{HF tensor name: (our variable, to_ours, to_hf)}` for every weight of
    the backbone, in the HF naming of its family. `to_ours` converts an HF
    array to our variable's layout, `to_hf` converts back."""
    sandwich = backbone.use_sandwich_norms
    N, K, H = backbone.num_query_heads, backbone.num_key_value_heads, backbone.head_dim

    def identity(w):
        return w

    def transpose(w):
        return w.T

    same, transposed = (identity, identity), (transpose, transpose)

    def heads_in(num_heads):  # [heads*H, D] <-> [heads, D, H]
        return (
            lambda w: w.reshape(num_heads, H, -1).transpose(0, 2, 1),
            lambda w: w.transpose(0, 2, 1).reshape(num_heads * H, -1),
        )

    heads_out = (  # [D, N*H] <-> [N, H, D]
        lambda w: w.T.reshape(N, H, -1),
        lambda w: w.reshape(N * H, -1).T,
    )

    mapping = {
        "model.embed_tokens.weight": (backbone.token_embedding.embeddings, *same),
        "model.norm.weight": (backbone.layer_norm.scale, *same),
    }
    for i, block in enumerate(backbone.transformer_layers):
        prefix = f"model.layers.{i}."
        attention = block.attention
        names = {
            "input_layernorm": (block.pre_attention_norm.scale, *same),
            "self_attn.q_proj": (attention.query_dense.kernel, *heads_in(N)),
            "self_attn.k_proj": (attention.key_dense.kernel, *heads_in(K)),
            "self_attn.v_proj": (attention.value_dense.kernel, *heads_in(K)),
            "self_attn.o_proj": (attention.output_dense.kernel, *heads_out),
            "mlp.gate_proj": (block.gating_ffw.kernel, *transposed),
            "mlp.up_proj": (block.gating_ffw_2.kernel, *transposed),
            "mlp.down_proj": (block.ffw_linear.kernel, *transposed),
        }
        if sandwich:
            names["post_attention_layernorm"] = (block.post_attention_norm.scale, *same)
            names["pre_feedforward_layernorm"] = (block.pre_ffw_norm.scale, *same)
            names["post_feedforward_layernorm"] = (block.post_ffw_norm.scale, *same)
        else:
            # In Gemma 1, HF's post_attention_layernorm is the norm before the MLP.
            names["post_attention_layernorm"] = (block.pre_ffw_norm.scale, *same)
        if backbone.use_query_key_norm:
            names["self_attn.q_norm"] = (attention.query_norm.scale, *same)
            names["self_attn.k_norm"] = (attention.key_norm.scale, *same)
        for name, target in names.items():
            mapping[f"{prefix}{name}.weight"] = target
    return mapping


def load_hf_weights(backbone, get_tensor, source="checkpoint"):
    """Assign HF-named weights to `backbone`, one tensor at a time.

    `get_tensor(name)` returns a numpy array or raises `KeyError` (whose
    argument may give the name the format stores it under). Every weight
    must be present with the right shape; errors name the tensor.
    """
    for name, (variable, to_ours, _) in hf_weight_names(backbone).items():
        try:
            tensor = get_tensor(name)
        except KeyError as e:
            stored = e.args[0] if e.args else name
            where = "" if stored == name else f" (stored as {stored!r})"
            raise ValueError(
                f"{source} is missing tensor {name!r}{where}: the file is incomplete, "
                "or its config describes a larger model (more layers?)."
            ) from None
        try:  # Splitting heads fails outright when the config's count is wrong.
            value = to_ours(np.asarray(tensor))
        except ValueError:
            value = None
        if value is None or tuple(value.shape) != tuple(variable.shape):
            raise ValueError(
                f"{source}: tensor {name!r} has shape {tuple(np.shape(tensor))}, "
                f"which does not fit {variable.path} {tuple(variable.shape)}. "
                "Is the config right for these weights?"
            )
        _set_value(variable, value)


def _set_value(variable, value):
    """Assign a numpy array; a variable built without a value (see
    `importer.build_causal_lm`) gets its first value here, so an import never
    holds a randomly initialized copy of the model."""
    import keras

    if keras.config.backend() == "torch" and value.dtype == ml_dtypes.bfloat16:
        import torch  # torch cannot take numpy bfloat16: reinterpret the bits.

        value = torch.from_numpy(np.ascontiguousarray(value).view(np.int16)).view(torch.bfloat16)
    value = keras.ops.convert_to_tensor(value, dtype=variable.dtype)
    if variable._value is None:
        variable._initialize(value)
    else:
        variable.assign(value)


# === Reading a checkpoint directory ===


def read_json(path):
    """A JSON file's object (every file read here holds one); errors name
    the file."""
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path} does not hold a JSON object; the file is damaged.")
    return content


def backbone_kwargs_from_config(config, source):
    """`backbone_kwargs_from_hf_config` with errors that name `source` (the
    config's file)."""
    try:
        return backbone_kwargs_from_hf_config(config)
    except KeyError as e:
        raise ValueError(f"{source} lacks the key {e}.") from None
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def read_tokenizer(directory):
    """`(SentencePiece proto bytes, stop pieces)` from `tokenizer.model` and
    `generation_config.json`'s `eos_token_id` (default `("<eos>",)`).

    `tokenizer.json` adds the tokens a fine-tune added beyond
    `tokenizer.model`'s pieces; without `tokenizer.model` (transformers 5
    saves only `tokenizer.json`) the SentencePiece model is rebuilt from it.
    """
    import sentencepiece

    from keras_gemma.checkpoints import sentencepiece_model

    path = os.path.join(directory, TOKENIZER_FILE)
    json_path = os.path.join(directory, TOKENIZER_JSON_FILE)
    if os.path.isfile(path):
        with open(path, "rb") as f:
            proto = f.read()
        source = path
    elif not os.path.isfile(json_path):
        raise FileNotFoundError(
            f"{directory} has no {TOKENIZER_FILE} or {TOKENIZER_JSON_FILE}: "
            "keras_gemma needs the model's tokenizer next to the weights. Copy "
            f"{TOKENIZER_FILE} from the model's original release there."
        )
    processor = sentencepiece.SentencePieceProcessor()
    try:
        if os.path.isfile(json_path):
            tokenizer_json = read_json(json_path)
            if os.path.isfile(path):
                proto = sentencepiece_model.with_added_tokens(proto, tokenizer_json, json_path)
            else:
                proto = sentencepiece_model.from_tokenizer_json(tokenizer_json, json_path)
                source = json_path
        processor.LoadFromSerializedProto(proto)
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{json_path} is not a tokenizers file that keras_gemma can read ({e!r}).") from None
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"{source} is not a SentencePiece model ({e}).") from None

    stop_tokens = ("<eos>",)
    generation_path = os.path.join(directory, GENERATION_CONFIG_FILE)
    if os.path.isfile(generation_path):
        eos = read_json(generation_path).get("eos_token_id")
        ids = [] if eos is None else eos if isinstance(eos, list) else [eos]
        unknown = [i for i in ids if type(i) is not int or not 0 <= i < processor.vocab_size()]
        if unknown:
            raise ValueError(
                f"{generation_path}: eos_token_id {unknown} is not a token id of "
                f"{source} ({processor.vocab_size()} pieces)."
            )
        if ids:
            stop_tokens = tuple(processor.id_to_piece(i) for i in ids)
    return proto, stop_tokens


def _weight_files(directory):
    """The safetensors files of a checkpoint directory: `model.safetensors`
    where there is one, as transformers prefers it (`save_pretrained` into a
    directory saved sharded before leaves the old index behind), else the
    shards its index lists."""
    single = os.path.join(directory, WEIGHTS_FILE)
    if os.path.isfile(single):
        return [single]
    index = os.path.join(directory, WEIGHTS_INDEX_FILE)
    if os.path.isfile(index):
        weight_map = read_json(index).get("weight_map") or {}
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ValueError(f"{index}: weight_map must map tensor names to files; the file is damaged.")
        files = [os.path.join(directory, f) for f in sorted(set(weight_map.values()))]
        missing = [f for f in files if not os.path.isfile(f)]
        if not files or missing:
            raise FileNotFoundError(
                f"{index} lists weight files that are not there: "
                f"{missing or 'none at all'}."
            )
        return files
    pickles = sorted(f for f in os.listdir(directory) if f.endswith(_PICKLE_SUFFIXES))
    if pickles:
        raise ValueError(
            f"{os.path.join(directory, pickles[0])} is a pickle file, which "
            "keras_gemma does not read: unpickling can execute code from the "
            "file. Convert the checkpoint to safetensors (for example "
            "`transformers.AutoModelForCausalLM.from_pretrained(dir)"
            ".save_pretrained(new_dir)` writes model.safetensors)."
        )
    raise FileNotFoundError(
        f"{directory} has no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}."
    )


def _text_model_name(key):
    """The causal-LM name of a stored tensor; None for vision tensors."""
    if key.startswith(_VISION_PREFIXES):
        return None
    for prefix, replacement in _TEXT_MODEL_PREFIXES.items():
        if key.startswith(prefix):
            return replacement + key[len(prefix):]
    return key


_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
}


def _safetensors_header(file):
    """`{name: (dtype, shape, start, end)}` with absolute byte offsets. The
    header is checked as the safetensors library checks it (a damaged one
    could otherwise read the header's own bytes as weights): each tensor's
    bytes are as many as its shape and dtype need, and together they fill
    the data exactly, without overlaps or gaps."""
    try:
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            if not 0 < header_size <= size - 8:
                raise ValueError("bad header size")
            header = json.loads(f.read(header_size))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        header.pop("__metadata__", None)
        base = 8 + header_size
        entries, unsupported = {}, None
        for key, info in header.items():
            offsets, shape = info["data_offsets"], info["shape"]
            for field, value in (("data_offsets", offsets), ("shape", shape)):
                if not isinstance(value, list) or not all(_is_size(v) for v in value):
                    raise ValueError(f"tensor {key!r} has {field} {value!r}, not a list of whole numbers >= 0")
            start, end = offsets
            dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                unsupported = unsupported or (key, info["dtype"])
            elif math.prod(shape) * np.dtype(dtype).itemsize != end - start:
                raise ValueError(f"tensor {key!r} has {end - start} bytes for shape {shape}")
            entries[key] = (dtype, tuple(shape), base + start, base + end)
        position = base
        for key, (_, _, start, end) in sorted(entries.items(), key=lambda item: item[1][2:]):
            if start != position or end < start:
                raise ValueError(f"tensor {key!r} overlaps another or leaves a gap before it")
            position = end
        if position != size:
            raise ValueError(f"its tensors end at byte {position} of {size}")
        if unsupported:
            key, stored = unsupported
            raise UnsupportedDtype(
                f"{file}: tensor {key!r} is stored as {stored}, which keras_gemma "
                f"does not read (it reads {', '.join(_SAFETENSORS_DTYPES)}). "
                "Use a float16/bfloat16/float32 release of the model."
            )
        return entries
    except UnsupportedDtype:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{file} is not a readable safetensors file ({e}); it is "
            "probably truncated or corrupt: download it again."
        ) from None


def _is_size(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class UnsupportedDtype(ValueError):
    """A readable file whose tensors are in a dtype we do not read."""


def _safetensors_reader(files, read_names):
    """`(get_tensor(name), stored_names)` over safetensors files: each tensor
    is read from disk when asked for, in its stored dtype, into a fresh
    array, and its name added to `read_names`. Plain reads rather than a
    memory map: mapped file pages would count in the process's memory until
    the file is closed (measured: +1x the checkpoint size)."""
    where = {}
    for file in files:
        for key, entry in _safetensors_header(file).items():
            name = _text_model_name(key)
            if name in where:  # (The file read last silently won.)
                first = where[name][0]
                raise ValueError(
                    f"Tensor {name!r} is stored twice, in {first if first == file else f'{first} and {file}'}: "
                    "the checkpoint's files are damaged or from different saves. Download it again."
                )
            if name is not None:
                where[name] = (file, key, entry)
    # transformers ignores these too: rotary tables of old files, and an
    # output head saved although it is tied to the embedding.
    stored_names = frozenset(
        name for name in where if name != "lm_head.weight" and not name.endswith("rotary_emb.inv_freq")
    )

    def get_tensor(name):
        file, key, (dtype, shape, start, end) = where[name]
        read_names.add(name)
        array = np.empty(shape, dtype)  # Its size was checked against the file's.
        with open(file, "rb") as f:
            f.seek(start)
            if f.readinto(array.reshape(-1).view(np.uint8)) != array.nbytes:
                raise ValueError(f"{file}: cannot read tensor {key!r}; the file is truncated.")
        return array

    return get_tensor, stored_names


def read_checkpoint_dir(path):
    """An `ImportedCheckpoint` for a Hugging Face checkpoint directory
    (model_type gemma, gemma2, gemma3_text, or gemma3's text model)."""
    from keras_gemma.checkpoints.importer import ImportedCheckpoint

    config_path = os.path.join(path, CONFIG_FILE)
    backbone_kwargs = backbone_kwargs_from_config(read_json(config_path), config_path)
    files = _weight_files(path)
    read_names = set()
    get_tensor, stored_names = _safetensors_reader(files, read_names)
    return ImportedCheckpoint(
        # Errors about a tensor name the file when there is only one.
        source=files[0] if len(files) == 1 else path,
        backbone_kwargs=backbone_kwargs,
        get_tensor=get_tensor,
        read_tokenizer=lambda: read_tokenizer(path),
        stored_names=stored_names,
        read_names=read_names,
    )


# === Exporting ===


def hf_config_from_backbone(backbone):
    """The transformers `config.json` dict for `backbone` (see
    `hf_config_from_backbone_config`)."""
    return hf_config_from_backbone_config(backbone.get_config())


def _backbone_arguments(config):
    """A `GemmaBackbone` config (`get_config()`'s, or a preset's) with the
    constructor's defaults filled in for the keys it leaves out."""
    import inspect

    from keras_gemma.models.gemma_backbone import GemmaBackbone

    defaults = {
        name: p.default
        for name, p in inspect.signature(GemmaBackbone.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    return {**defaults, **config}


def _sliding_window_pattern(layer_types):
    """The period p of `layer_types` when every p-th layer is global and the
    others slide (`sliding_window_pattern`, which transformers before 4.53
    read instead of `layer_types`); None for another arrangement."""
    for period in range(1, len(layer_types) + 1):
        pattern = ["global" if (i + 1) % period == 0 else "sliding" for i in range(len(layer_types))]
        if pattern == list(layer_types):
            return period
    return None


def hf_config_from_backbone_config(backbone_config):
    """The transformers `config.json` dict for a backbone of this config
    (`GemmaBackbone.get_config()`, or the config of a saved preset: no
    weights are needed).

    The model type follows the backbone's features: query/key norms mean
    gemma3_text, sandwich norms gemma2, otherwise gemma. A backbone that the
    chosen HF architecture cannot compute (say, soft-caps without sandwich
    norms) is refused rather than exported wrong. Every key that shapes the
    computation is written, none left to transformers' defaults (which
    differ between its versions and families).
    """
    args = _backbone_arguments(backbone_config)
    if args["use_query_key_norm"]:
        model_type = "gemma3_text"
    elif args["use_sandwich_norms"]:
        model_type = "gemma2"
    else:
        model_type = "gemma"
    head_dim = args["head_dim"]
    layer_types = list(args["layer_types"] or ["global"] * args["num_layers"])
    config = dict(
        architectures=[_ARCHITECTURES[model_type]],
        model_type=model_type,
        vocab_size=args["vocabulary_size"],
        hidden_size=args["hidden_dim"],
        intermediate_size=args["intermediate_dim"],
        num_hidden_layers=args["num_layers"],
        num_attention_heads=args["num_query_heads"],
        num_key_value_heads=args["num_key_value_heads"],
        head_dim=head_dim,
        rms_norm_eps=args["layer_norm_epsilon"],
        # Gemma 1 configs name the activation hidden_act, later ones
        # hidden_activation; some old files say exact "gelu". Be explicit.
        hidden_act="gelu_pytorch_tanh",
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=context_length(args),
        rope_theta=args["rope_max_wavelength"],
        attention_bias=False,
        attention_dropout=0.0,
        use_bidirectional_attention=False,
        tie_word_embeddings=True,
        use_cache=True,
        initializer_range=0.02,
    )
    if model_type != "gemma":
        layer_names = {ours: theirs for theirs, ours in _LAYER_TYPES.items()}
        config.update(
            query_pre_attn_scalar=args["query_scale"] or head_dim,
            attn_logit_softcapping=args["attention_logit_soft_cap"],
            final_logit_softcapping=args["final_logit_soft_cap"],
            # transformers builds the sliding mask even where no layer uses
            # it, and fails without a window: one as long as the context.
            sliding_window=args["sliding_window"] or config["max_position_embeddings"],
            layer_types=[layer_names[t] for t in layer_types],
        )
    if model_type == "gemma3_text":
        factor = args["rope_scaling_factor"]
        config.update(
            rope_local_base_freq=(
                args["local_rope_max_wavelength"] or args["rope_max_wavelength"]
            ),
            rope_scaling=(
                None if factor == 1 else {"rope_type": "linear", "factor": factor}
            ),
        )
        pattern = _sliding_window_pattern(layer_types)
        if pattern is not None:
            config["sliding_window_pattern"] = pattern
    _check_config_expresses(config, args)
    return config


def _check_config_expresses(config, backbone_args):
    """Raise unless reading `config` back gives the architecture of the
    backbone of `backbone_args` (a complete argument dict)."""

    def architecture(kwargs):
        kwargs = _backbone_arguments(kwargs)
        for name in ("dropout", "dtype", "name", "trainable", "quantization_configs"):
            kwargs.pop(name, None)
        # Spell the defaults that have two spellings one way.
        kwargs["query_scale"] = kwargs["query_scale"] or kwargs["head_dim"]
        kwargs["local_rope_max_wavelength"] = (
            kwargs["local_rope_max_wavelength"] or kwargs["rope_max_wavelength"]
        )
        kwargs["layer_types"] = list(kwargs["layer_types"] or ["global"] * kwargs["num_layers"])
        if "sliding" not in kwargs["layer_types"]:
            kwargs["sliding_window"] = None
        return kwargs

    ours = architecture(backbone_args)
    theirs = architecture(backbone_kwargs_from_hf_config(config))
    differ = sorted(k for k in theirs if theirs[k] != ours.get(k))
    if differ:
        raise ValueError(
            f"This backbone cannot be exported as Hugging Face model_type "
            f"{config['model_type']!r}: it would change "
            + ", ".join(f"{k} ({ours.get(k)!r} -> {theirs[k]!r})" for k in differ)
            + "."
        )


def export_to_transformers(gemma_lm, path):
    """Write `gemma_lm` as a Hugging Face transformers checkpoint directory:
    `config.json`, `model.safetensors`, `tokenizer.model`,
    `tokenizer_config.json` and `generation_config.json`, loadable with
    `transformers.AutoModelForCausalLM.from_pretrained(path)` and
    `AutoTokenizer.from_pretrained(path)` (which adds `<bos>`, as ours).

    Weights keep the backbone's variable dtype (LoRA adapters, when enabled,
    are merged in); writing them takes one extra copy of the weights in
    memory. The files are written to a temporary sibling directory that is
    renamed to `path` at the end, so a failure leaves nothing behind. An
    existing non-empty `path` is refused.
    """
    import keras

    path = os.path.abspath(os.path.expanduser(os.fspath(path)))  # Else a "~" directory in the cwd.
    # (A dangling link too: the final rename would fail, after the writing.)
    if os.path.lexists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise FileExistsError(
            f"{path} already exists and is not an empty directory; "
            "export_to_transformers does not overwrite. Pick a new path."
        )
    if gemma_lm.preprocessor is None or gemma_lm.preprocessor.tokenizer.proto is None:
        raise ValueError(
            "export_to_transformers needs the model's tokenizer: give the "
            "GemmaCausalLM a preprocessor with a loaded GemmaTokenizer."
        )
    backbone, preprocessor = gemma_lm.backbone, gemma_lm.preprocessor
    tokenizer = preprocessor.tokenizer
    special_ids = dict(
        bos_token_id=tokenizer.start_token_id,
        eos_token_id=tokenizer.end_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    dtype = keras.backend.standardize_dtype(backbone.dtype_policy.variable_dtype)
    stop_ids = preprocessor.stop_token_ids
    generation_config = {
        **special_ids,
        "eos_token_id": stop_ids[0] if len(stop_ids) == 1 else stop_ids,
    }
    # Special pieces, so that transformers' decode(skip_special_tokens=True)
    # (pipelines, chat apps) drops the chat markers as it does for Google's
    # own files.
    special_piece_ids = {f"<{name}>": tokenizer.piece_id(f"<{name}>") for name in _SPECIAL_NAMES}
    tokenizer_config = {
        "tokenizer_class": "GemmaTokenizer",
        # Without it transformers' GemmaTokenizer adds no <bos>, and Gemma
        # without <bos> degrades ("France. France. France.").
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        **{f"{name}_token": f"<{name}>" for name in ("bos", "eos", "pad", "unk")},
        "added_tokens_decoder": {
            str(token_id): {
                "content": piece, "special": True, "normalized": False,
                "lstrip": False, "rstrip": False, "single_word": False,
            }
            for piece, token_id in special_piece_ids.items()
            if token_id is not None
        },
    }

    with staged_directory(path) as staging:
        write_transformers_weights(backbone, staging, dtype, special_ids)
        for name, content in (
            (GENERATION_CONFIG_FILE, generation_config),
            (TOKENIZER_CONFIG_FILE, tokenizer_config),
        ):
            with open(os.path.join(staging, name), "w", encoding="utf-8") as f:
                json.dump(content, f, indent=2)
        with open(os.path.join(staging, TOKENIZER_FILE), "wb") as f:
            f.write(tokenizer.proto)


GEMMA_SPECIAL_IDS = {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}


def write_transformers_weights(backbone, directory, dtype="float32", special_ids=GEMMA_SPECIAL_IDS):
    """Write `model.safetensors` and a `config.json` for `backbone` into
    `directory`; no tokenizer. Returns the number of bytes of weights written."""
    import keras
    from safetensors.numpy import save_file

    directory = os.path.expanduser(os.fspath(directory))
    quantized = [
        layer.path for layer in backbone._flatten_layers()
        if getattr(layer, "quantization_mode", None)
    ]
    if quantized:
        raise ValueError(
            f"The model is quantized ({quantized[0]} and {len(quantized) - 1} more "
            "layers): the Hugging Face format holds float weights. Export the model "
            "before `quantize()`, or load it again without quantizing."
        )
    # `dtype` is transformers' name since 4.56; older versions read `torch_dtype`.
    config = {**hf_config_from_backbone(backbone), **special_ids, "dtype": dtype, "torch_dtype": dtype}
    with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    tensors = {}
    for name, (variable, _, to_hf) in hf_weight_names(backbone).items():
        value = keras.ops.convert_to_numpy(keras.ops.cast(variable, "float32"))
        tensors[name] = np.ascontiguousarray(to_hf(value)).astype(dtype)
    save_file(tensors, os.path.join(directory, WEIGHTS_FILE), metadata={"format": "pt"})
    return sum(t.nbytes for t in tensors.values())
