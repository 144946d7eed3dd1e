"""Streaming generation (the CLI's `generate` and `chat`): the same text as
`generate()`, with compiled steps reused across calls."""

import keras
import pytest

import keras_gemma
from keras_gemma.models.streaming import stream_text
from keras_gemma.models.streaming import streaming_steps
from tests import helpers
from tests.test_presets import randomize_weights

# Sliding layers with a window shorter than the prompts: the prefill's
# padding must not overwrite the ring buffer's real positions.
CONFIG = dict(helpers.TINY_MQA, num_layers=3, sliding_window=4,
              layer_types=["sliding", "global", "sliding"])
LONG_PROMPT = "The quick brown fox jumps over the lazy dog. Gemma is a family of"


@pytest.fixture(scope="module")
def gemma_lm(spm_proto, vocabulary_size):
    backbone = keras_gemma.GemmaBackbone(vocabulary_size=vocabulary_size, **CONFIG)
    randomize_weights(backbone)
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor(
        keras_gemma.GemmaTokenizer(proto=spm_proto), sequence_length=64
    )
    return keras_gemma.GemmaCausalLM(backbone, preprocessor)


def traces(steps):
    if keras.config.backend() == "jax":
        return sum(f._cache_size() for f in steps.compiled)
    return sum(f.experimental_get_tracing_count() for f in steps.compiled)


@pytest.mark.parametrize("prompt, max_length", [("hello", 12), (LONG_PROMPT, 60)])
def test_streamed_text_is_generates(gemma_lm, prompt, max_length):
    prompt_length = len(gemma_lm.preprocessor.tokenizer(prompt)) + 1
    assert max_length - prompt_length >= 5  # Several tokens generated.
    pieces = list(stream_text(gemma_lm, prompt, max_length=max_length))
    assert len(pieces) > 1  # Yielded as produced, not all at the end.
    assert prompt + "".join(pieces) == gemma_lm.generate(prompt, max_length=max_length)


def test_calls_of_nearby_lengths_reuse_the_compiled_steps(gemma_lm):
    """Each chat turn is a new call with a longer prompt and max_length:
    within one bucket (prefill 16/32/..., cache 256/512/...), nothing
    compiles again."""
    list(stream_text(gemma_lm, "hello", max_length=20))
    steps = streaming_steps(gemma_lm)
    if keras.config.backend() == "torch":
        assert steps.compiled == []  # Eager: nothing to compile.
    else:
        compiled = traces(steps)
        assert compiled >= 2  # At least one prefill shape and the decode step.
        list(stream_text(gemma_lm, "hello world, hello gemma", max_length=30))
        assert streaming_steps(gemma_lm) is steps and traces(steps) == compiled


def test_new_variables_get_new_steps(spm_proto, vocabulary_size):
    """After enable_lora the steps are rebuilt (the old ones would not see
    the adapters on TensorFlow)."""
    backbone = keras_gemma.GemmaBackbone(vocabulary_size=vocabulary_size, **helpers.TINY_MQA)
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor(keras_gemma.GemmaTokenizer(proto=spm_proto))
    gemma_lm = keras_gemma.GemmaCausalLM(backbone, preprocessor)
    steps = streaming_steps(gemma_lm)
    assert streaming_steps(gemma_lm) is steps
    backbone.enable_lora(2)
    assert streaming_steps(gemma_lm) is not steps
