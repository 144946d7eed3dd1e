"""keras_gemma: Gemma open models for Keras 3 on JAX, TensorFlow and PyTorch.

The public classes import lazily, so that `python -m keras_gemma --backend X`
can choose the Keras backend before Keras is imported.
"""

import importlib

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
