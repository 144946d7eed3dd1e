"""Streaming generation (the CLI's `generate` and `chat`): the same text as
`generate()`, with compiled steps reused across calls."""

import keras
import keras_hub
import numpy as np
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


def tiny_streaming_lm(spm_proto, vocabulary_size):
    backbone = keras_gemma.GemmaBackbone(vocabulary_size=vocabulary_size, **CONFIG)
    randomize_weights(backbone)
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor(
        keras_gemma.GemmaTokenizer(proto=spm_proto), sequence_length=64
    )
    return keras_gemma.GemmaCausalLM(backbone, preprocessor)


@pytest.fixture(scope="module")
def gemma_lm(spm_proto, vocabulary_size):
    return tiny_streaming_lm(spm_proto, vocabulary_size)


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


@pytest.mark.parametrize(
    "kwargs, message",
    [
        # Each of these was silent or a raw error; generate() refused them.
        (dict(stop_token_ids="<eos>"), "stop_token_ids must be 'auto', None or a list of token ids"),
        (dict(stop_token_ids=1), "stop_token_ids must be 'auto', None or a list of token ids"),
        (dict(stop_token_ids=[10**9]), r"stop_token_ids \[1000000000\] are not token ids"),
        (dict(max_length=0), "max_length must be a positive whole number"),
        (dict(max_length=10.5), "max_length must be a positive whole number"),
        (dict(max_length=10**12), "needs a KV cache of .* GiB .* more than this machine's"),
    ],
)
def test_bad_arguments_are_generates_errors(gemma_lm, kwargs, message):
    with pytest.raises(ValueError, match=message):
        next(stream_text(gemma_lm, "hello", **kwargs))
    with pytest.raises(ValueError, match=message):
        gemma_lm.generate("hello", **kwargs)


def test_one_prompt_at_a_time(gemma_lm):
    """A list failed deep in the tokenizer ("all elements must be strings")."""
    with pytest.raises(ValueError, match=r"stream_text streams one prompt \(a string\); got a list.*generate\(\)"):
        next(stream_text(gemma_lm, ["hello", "hi"]))
    # Bytes were called "several prompts".
    with pytest.raises(ValueError, match=r"takes the prompt as a string; decode the bytes first"):
        next(stream_text(gemma_lm, b"hello"))


def test_whole_sequence_searches_are_refused(spm_proto, vocabulary_size):
    gemma_lm = tiny_streaming_lm(spm_proto, vocabulary_size)
    gemma_lm.compile(sampler="beam")
    with pytest.raises(ValueError, match="BeamSampler searches over whole sequences.*Use generate"):
        next(stream_text(gemma_lm, "hello"))


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


@pytest.fixture
def prefills(monkeypatch):
    """Returns a function that records each `(start, end)` its model's
    streaming prefill is called with."""

    def record(gemma_lm):
        steps, calls = streaming_steps(gemma_lm), []
        prefill = steps.prefill

        def recorded(token_ids, cache, start, end):
            calls.append((start, end))
            return prefill(token_ids, cache, start, end)

        monkeypatch.setattr(steps, "prefill", recorded)
        return calls

    return record


def prompt_length(gemma_lm, prompt):
    return len(gemma_lm.preprocessor.tokenizer(prompt)) + 1  # <bos>


def shared_prefix(a, b):
    """How many leading token ids `a` and `b` share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_resumed_turns_prefill_only_their_new_tokens(spm_proto, vocabulary_size, prefills):
    """A chat's next turn (the previous prompt and reply, then more) starts
    its prefill after the cached tokens, a prompt that leaves the previous
    one earlier starts where they differ (the later cached positions are
    overwritten), and a longer max_length grows the cache: each gives
    `generate()`'s text."""
    backbone = keras_gemma.GemmaBackbone(vocabulary_size=vocabulary_size, **helpers.TINY_MQA)
    randomize_weights(backbone)
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor(keras_gemma.GemmaTokenizer(proto=spm_proto))
    gemma_lm = keras_gemma.GemmaCausalLM(backbone, preprocessor)
    calls = prefills(gemma_lm)

    first = "The quick brown fox"
    reply = "".join(stream_text(gemma_lm, first, max_length=16, resume=True))
    assert calls == [(0, prompt_length(gemma_lm, first))]  # Nothing cached yet.
    for prompt, max_length, at_least in [
        (first + reply + " jumps over", 40, prompt_length(gemma_lm, first)),  # After the prompt.
        ("The quick red fox", 300, 2),  # Where the tokens differ; cache 256 -> 512 slots.
    ]:
        cached_ids = streaming_steps(gemma_lm).conversation[0]  # Prompt and reply.
        prompt_ids = gemma_lm.preprocessor.generate_preprocess([prompt], sequence_length=max_length)
        prompt_ids = np.asarray(prompt_ids["token_ids"])[0, : prompt_length(gemma_lm, prompt)]
        text = "".join(stream_text(gemma_lm, prompt, max_length=max_length, resume=True))
        assert prompt + text == gemma_lm.generate(prompt, max_length=max_length)
        assert calls[-1] == (shared_prefix(cached_ids, prompt_ids), len(prompt_ids))
        assert calls[-1][0] >= at_least
    text = "".join(stream_text(gemma_lm, "The quick red fox", max_length=20))
    assert calls[-1][0] == 0  # resume=False: the whole prompt.


def test_resuming_past_a_wrapped_ring_buffer(gemma_lm, prefills):
    """The sliding layers' ring buffers (window 4) have wrapped: a prompt
    that extends the cached tokens resumes after them; one that leaves
    them earlier needs positions the ring no longer holds, and starts
    over. Both give `generate()`'s text."""
    calls = prefills(gemma_lm)
    first = LONG_PROMPT[: LONG_PROMPT.index(" Gemma")]
    # One token, never fed back: the cache holds exactly `first`'s tokens.
    length = prompt_length(gemma_lm, first)
    list(stream_text(gemma_lm, first, max_length=length + 1, resume=True))
    for prompt, start in [(LONG_PROMPT, length), ("The quick brown cat", 0)]:
        text = "".join(stream_text(gemma_lm, prompt, max_length=60, resume=True))
        assert prompt + text == gemma_lm.generate(prompt, max_length=60)
        assert calls[-1] == (start, prompt_length(gemma_lm, prompt))


def test_embedding_rows_without_tokenizer_pieces_are_never_generated(spm_proto, vocabulary_size):
    """Hugging Face's Gemma 3 4B+ files have 64 more embedding rows than
    tokenizer pieces (image tokens): a sampled id there could not be turned
    into text (IndexError)."""
    extra = 4 * vocabulary_size  # Near-uniform sampling picks one at once.
    backbone = keras_gemma.GemmaBackbone(vocabulary_size=vocabulary_size + extra, **CONFIG)
    randomize_weights(backbone)
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor(
        keras_gemma.GemmaTokenizer(proto=spm_proto), sequence_length=64
    )
    gemma_lm = keras_gemma.GemmaCausalLM(backbone, preprocessor)
    gemma_lm.compile(sampler=keras_hub.samplers.RandomSampler(temperature=1e4, seed=0))
    # Without the fix these raised IndexError (piece id is out of range).
    assert len(gemma_lm.generate("The quick brown", max_length=32, stop_token_ids=None)) > 20
    streamed = "".join(stream_text(gemma_lm, "The quick brown", max_length=32, stop_token_ids=None))
    assert len(streamed) > 10
    # Token ids in and out (no tokenizer): every row may be generated, and
    # the sampling reaches the extra rows.
    gemma_lm.preprocessor = None
    outputs = gemma_lm.generate({"token_ids": [[2, 9, 14] + [0] * 29],
                                 "padding_mask": [[1] * 3 + [0] * 29]},
                                stop_token_ids=None)
    assert np.asarray(outputs["token_ids"])[0, 3:].max() >= vocabulary_size
