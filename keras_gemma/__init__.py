"""keras_gemma: Gemma open models for Keras 3 on JAX, TensorFlow and PyTorch.

Importing the package imports Keras and registers the classes with it (so
that `keras.models.load_model` finds them in a `.keras` file), except when
it starts the command (`python -m keras_gemma`, `keras-gemma`): then the
classes import on first use, after `--backend X` has chosen Keras' backend.
"""

import importlib
import os
import sys

__version__ = "0.1.0"

_EXPORTS = {
    "GemmaBackbone": "keras_gemma.models.gemma_backbone",
    "GemmaCausalLM": "keras_gemma.models.gemma_causal_lm",
    "GemmaCausalLMPreprocessor": "keras_gemma.models.gemma_causal_lm_preprocessor",
    "GemmaTokenizer": "keras_gemma.models.gemma_tokenizer",
    "format_chat": "keras_gemma.chat",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'keras_gemma' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)


def _started_as_command():
    # While `python -m` locates the package, `sys.argv[0]` is "-m".
    argv0 = sys.argv[0] if sys.argv else ""
    return argv0 == "-m" or os.path.basename(argv0) == "keras-gemma"


if not _started_as_command():
    for _name in ("GemmaBackbone", "GemmaCausalLM", "GemmaCausalLMPreprocessor", "GemmaTokenizer"):
        importlib.import_module(_EXPORTS[_name])
