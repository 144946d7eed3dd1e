"""keras_gemma: Gemma open models for Keras 3 on JAX, TensorFlow and PyTorch."""

from keras_gemma.models.gemma_backbone import GemmaBackbone
from keras_gemma.models.gemma_causal_lm import GemmaCausalLM
from keras_gemma.models.gemma_causal_lm_preprocessor import GemmaCausalLMPreprocessor
from keras_gemma.models.gemma_tokenizer import GemmaTokenizer

__version__ = "0.1.0"
