"""`keras-gemma convert`: any supported source to a Keras preset or to HF."""

import contextlib
import dataclasses
import os
import sys

from keras_gemma.staging import staged_directory

WEIGHT_DTYPES = ("float32", "bfloat16", "float16")
# Quantization modes: `quantize()` takes them, dtype arguments do not.
QUANTIZATION_MODES = ("int8", "int4", "float8")


def _check_destination(destination):
    """Before the (long) load: `destination` is new and can be created."""
    if os.path.lexists(destination):  # A dangling link too: the rename would fail.
        raise ValueError(
            f"{destination} already exists; choose a new directory (nothing "
            "is overwritten)."
        )
    ancestor = os.path.dirname(destination)
    while not os.path.exists(ancestor):  # Missing parents are created.
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor) or not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"Cannot create {destination}: {ancestor} is not a writable directory.")


def _load_with_progress(checkpoint, dtype):
    """Build the model from `checkpoint`, counting tensors on a progress bar
    as the importer reads them; the bar ends its line when the load ends.
    The bar goes to stderr, and only to a terminal or a notebook: on stdout
    (Keras' place for it) it mixed its redraws into the command's output."""
    import keras

    from keras_gemma.checkpoints.importer import build_causal_lm

    if not (sys.stderr.isatty() or "ipykernel" in sys.modules):
        return build_causal_lm(checkpoint, dtype)
    get_tensor = checkpoint.get_tensor

    def counted(name):  # Stored tensors read so far (one may hold several weights).
        tensor = get_tensor(name)
        bar.update(len(checkpoint.read_names))
        return tensor

    with contextlib.redirect_stdout(sys.stderr):
        bar = keras.utils.Progbar(len(checkpoint.stored_names) or None, unit_name="tensor")
        gemma_lm = build_causal_lm(dataclasses.replace(checkpoint, get_tensor=counted), dtype)
        bar.update(len(checkpoint.read_names), finalize=True)
    return gemma_lm


def _quantization_modes(backbone_config):
    """The quantization modes ("int8", ...) of a saved backbone config's
    layers; empty for a float model. A quantized model's `dtype` is a
    `DTypePolicyMap` of its layers' policies (one whose modes cannot be read
    counts as "quantized")."""
    dtype = backbone_config.get("dtype")
    if not (isinstance(dtype, dict) and dtype.get("class_name") == "DTypePolicyMap"):
        return []
    modes = set()
    policies = (dtype.get("config") or {}).get("policy_map") or {}
    for policy in policies.values():
        if isinstance(policy, dict):
            mode = (policy.get("config") or {}).get("mode")
        else:  # "int8_from_float32"
            mode = str(policy).partition("_from_")[0] if "_from_" in str(policy) else None
        if mode:
            modes.add(mode)
    return sorted(modes) or ["quantized"]


@dataclasses.dataclass
class _Source:
    """What the source's config says, read before its weights."""

    checkpoint: object = None  # An ImportedCheckpoint; None for a Keras preset.
    has_tokenizer: bool = True


def check_source(source, to="keras", dtype=None):
    """Read `source`'s config (not its weights) and refuse a conversion that
    the config alone shows cannot succeed: a quantized model to transformers
    or with a new dtype, an architecture transformers cannot compute, a
    transformers export without a tokenizer. Returns what the load needs."""
    from keras_gemma.checkpoints import loading
    from keras_gemma.checkpoints.hf import hf_config_from_backbone_config

    checkpoint = loading.foreign_checkpoint(source)  # Configs and headers only.
    if checkpoint is not None:
        # Imported checkpoints are float (GGUF's quantized tensors are
        # dequantized), with the tokenizer read before the weights.
        backbone_config, modes, has_tokenizer = checkpoint.backbone_kwargs, [], True
    else:
        from keras_hub.src.utils.preset_utils import TOKENIZER_CONFIG_FILE

        from keras_gemma.checkpoints.keras_preset import preset_file_exists

        loader = loading.get_preset_loader(source)
        backbone_config = loader.config["config"]
        modes = _quantization_modes(backbone_config)
        with loading.downloading(source):
            has_tokenizer = preset_file_exists(loader.preset, TOKENIZER_CONFIG_FILE)
    quantized = "/".join(modes)
    if modes and dtype is not None:
        raise ValueError(
            f"{source} holds a quantized ({quantized}) model, whose layers keep the "
            f"dtypes they were saved with: dtype {dtype!r} (--dtype) cannot apply. "
            "Convert it without a dtype, or convert the float model it was "
            "quantized from."
        )
    if to == "transformers":
        if modes:
            raise ValueError(
                f"{source} holds a quantized ({quantized}) model, and the Hugging "
                "Face transformers format holds float weights: it cannot be "
                "converted --to transformers. Convert the float model it was "
                "quantized from (saved before `quantize()`), or convert this one "
                "to a Keras preset (--to keras)."
            )
        if not has_tokenizer:
            raise ValueError(
                f"{source} holds no tokenizer ({TOKENIZER_CONFIG_FILE}; a backbone "
                "saved on its own?), and a Hugging Face directory needs one. Save "
                "the model with its tokenizer (`gemma_lm.save_to_preset(dir)`) and "
                "convert that."
            )
        try:
            hf_config_from_backbone_config(backbone_config)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
    return _Source(checkpoint, has_tokenizer)


def load_for_conversion(source, dtype, checked):
    """The model of `source`; `checked` is `check_source`'s answer."""
    from keras_gemma.models.gemma_causal_lm import GemmaCausalLM

    if checked.checkpoint is not None:
        return _load_with_progress(checked.checkpoint, dtype)
    kwargs = {"dtype": dtype} if dtype else {}
    if not checked.has_tokenizer:  # A backbone saved on its own: kept so.
        kwargs["preprocessor"] = None
    return GemmaCausalLM.from_preset(source, **kwargs)


def convert(source, destination, to="keras", dtype=None):
    """Write `source` to `destination` as a Keras preset (`to="keras"`) or
    a transformers directory (`to="transformers"`). What can be checked
    without the weights (the destination, the source's config) is checked
    before they load. A failed conversion leaves nothing at `destination`."""
    if to not in ("keras", "transformers"):
        raise ValueError(f"Unknown target format {to!r}; use 'keras' or 'transformers'.")
    if dtype not in (None, *WEIGHT_DTYPES):  # Before the (long) load.
        raise ValueError(
            f"dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {dtype!r}; quantize "
            "a loaded model with `quantize('int8')` and save it with save_to_preset."
        )
    destination = os.path.abspath(os.path.expanduser(destination))
    _check_destination(destination)
    checked = check_source(source, to, dtype)
    gemma_lm = load_for_conversion(source, dtype, checked)
    if to == "transformers":
        from keras_gemma.checkpoints.hf import export_to_transformers

        export_to_transformers(gemma_lm, destination)
        return destination
    with staged_directory(destination) as staging:
        gemma_lm.save_to_preset(staging)
    return destination
