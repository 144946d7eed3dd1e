import re
import warnings

import keras
import keras_hub
import numpy as np
import pytest

import keras_gemma
from keras_gemma.models.streaming import stream_text
from tests import helpers


@pytest.fixture(scope="module")
def models(vocabulary_size):
    return helpers.hf_reference_and_ours(vocabulary_size, helpers.TINY_MQA, seed=1)


@pytest.fixture
def gemma_lm(models, tokenizer):
    _, ours = models
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor(tokenizer, sequence_length=24)
    return keras_gemma.GemmaCausalLM(ours.backbone, preprocessor)


def reference_greedy(hf_model, prompt, num_new_tokens):
    """Greedy decoding by full forward passes of the transformers model."""
    ids = list(prompt)
    for _ in range(num_new_tokens):
        logits = helpers.hf_logits(hf_model, np.array([ids]))[0, -1]
        top2 = np.sort(logits)[-2:]
        assert top2[1] - top2[0] > 1e-3, "near tie: pick another seed"
        ids.append(int(np.argmax(logits)))
    return ids


def right_padded(prompts, length):
    token_ids = np.zeros((len(prompts), length), "int32")
    padding_mask = np.zeros((len(prompts), length), "int32")
    for row, prompt in enumerate(prompts):
        token_ids[row, : len(prompt)] = prompt
        padding_mask[row, : len(prompt)] = 1
    return {"token_ids": token_ids, "padding_mask": padding_mask}


def test_greedy_generation_matches_transformers(models, vocabulary_size):
    hf_model, ours = models
    prompts = [[2, 17, 40, 99, 23], [2, 250, 61]]  # Different lengths in one batch.
    out = ours.generate(right_padded(prompts, 14), stop_token_ids=None)
    for row, prompt in enumerate(prompts):
        expected = reference_greedy(hf_model, prompt, 14 - len(prompt))
        np.testing.assert_array_equal(np.asarray(out["token_ids"])[row], expected)


def test_generation_with_preprocessor(gemma_lm):
    single = gemma_lm.generate("hello", max_length=16)
    assert isinstance(single, str) and single.startswith("hello")
    batch = gemma_lm.generate(["hello", "The quick brown fox"], max_length=16)
    assert len(batch) == 2 and batch[1].startswith("The quick brown fox")
    assert batch[0] == single  # Batching does not change a row's result.
    assert gemma_lm.generate("hello", max_length=16) == single  # Deterministic.


def test_stop_token_ids_end_generation(models):
    _, ours = models
    inputs = right_padded([[2, 17, 40]], 12)
    free = np.asarray(ours.generate(inputs, stop_token_ids=None)["token_ids"])[0]
    stop = int(free[5])  # The third generated token.
    first = 3 + list(free[3:]).index(stop)
    out = ours.generate(inputs, stop_token_ids=[stop])
    mask = np.asarray(out["padding_mask"])[0]
    assert mask[: first + 1].all() and not mask[first + 1 :].any()
    np.testing.assert_array_equal(np.asarray(out["token_ids"])[0][: first + 1], free[: first + 1])


@pytest.mark.parametrize(
    "sampler",
    [
        lambda: keras_hub.samplers.TopKSampler(k=1, seed=0),
        lambda: keras_hub.samplers.TopPSampler(p=1e-6, seed=0),
        lambda: keras_hub.samplers.RandomSampler(temperature=1e-4, seed=0),
    ],
    ids=["top_k", "top_p", "random"],
)
def test_degenerate_samplers_equal_greedy(models, sampler):
    _, ours = models
    inputs = right_padded([[2, 17, 40], [2, 9]], 12)
    greedy = np.asarray(ours.generate(inputs, stop_token_ids=None)["token_ids"])
    ours.compile(sampler=sampler())
    try:
        sampled = np.asarray(ours.generate(inputs, stop_token_ids=None)["token_ids"])
    finally:
        ours.compile(sampler="greedy")
    np.testing.assert_array_equal(sampled, greedy)


def test_greedy_is_ours_and_gives_keras_hubs_tokens(models):
    """`sampler="greedy"` (the default) takes our GreedySampler (no softmax,
    two-pass argmax on JAX), with the tokens of KerasHub's."""
    _, ours = models
    assert type(ours.sampler) is keras_gemma.models.samplers.GreedySampler
    inputs = right_padded([[2, 17, 40], [2, 9]], 14)
    greedy = np.asarray(ours.generate(inputs, stop_token_ids=None)["token_ids"])
    ours.compile(sampler=keras_hub.samplers.GreedySampler())
    try:
        assert type(ours.sampler) is keras_hub.samplers.GreedySampler
        reference = np.asarray(ours.generate(inputs, stop_token_ids=None)["token_ids"])
    finally:
        ours.compile(sampler="greedy")
    np.testing.assert_array_equal(greedy, reference)


def test_beam_search_of_prompts_of_different_lengths_equals_transformers(models):
    """KerasHub's beam search starts at the shortest prompt's end and
    scored beams on the longer prompts' tokens: every row but the shortest
    came out wrong (all backends). Rows of one prompt length now search
    together."""
    import torch

    hf_model, ours = models
    prompts = [[2, 17], [2, 9, 11, 12, 40, 99, 23], [2, 250, 61, 7]]
    ours.compile(sampler=keras_hub.samplers.BeamSampler(num_beams=3))
    try:
        out = np.asarray(ours.generate(right_padded(prompts, 16), stop_token_ids=None)["token_ids"])
        # Each row's best beam of its own new tokens, not a longer one cut short.
        short = np.asarray(ours.generate(right_padded(prompts, 16), max_new_tokens=3, stop_token_ids=None)["token_ids"])
    finally:
        ours.compile(sampler="greedy")

    def transformers_beams(prompt, max_new_tokens):
        return hf_model.generate(
            torch.tensor([prompt]), num_beams=3, do_sample=False, max_new_tokens=max_new_tokens,
            length_penalty=0.0, early_stopping=False, eos_token_id=None, pad_token_id=0,
        )[0].tolist()

    for row, prompt in enumerate(prompts):
        assert out[row].tolist() == transformers_beams(prompt, 16 - len(prompt)), row
        expected = transformers_beams(prompt, 3)
        assert short[row].tolist() == expected + [0] * (16 - len(expected)), row


def test_greedy_needs_no_temperature(models):
    """Ours takes the largest logit: a temperature of 0 was refused with
    "use sampler='greedy' for deterministic decoding"."""
    _, ours = models
    inputs = right_padded([[2, 17, 40]], 8)
    greedy = np.asarray(ours.generate(inputs, stop_token_ids=None)["token_ids"])
    ours.compile(sampler=keras_gemma.models.samplers.GreedySampler(temperature=0))
    try:
        np.testing.assert_array_equal(np.asarray(ours.generate(inputs, stop_token_ids=None)["token_ids"]), greedy)
    finally:
        ours.compile(sampler="greedy")


def test_first_argmax_equals_argmax():
    """The first largest value, ties and NaN as `np.argmax`."""
    from keras_gemma.models.samplers import first_argmax

    x = np.random.default_rng(0).normal(size=(3, 1000)).astype("float32")
    x[1, [10, 500, 900]] = 9.0  # A tie: the first wins.
    x[2, [700, 800]] = np.nan  # NaN wins, as in np.argmax.
    got = keras.ops.convert_to_numpy(first_argmax(keras.ops.convert_to_tensor(x)))
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
    assert list(got[1:]) == [10, 700]


@pytest.mark.parametrize("name", ["top_k", "top_p", "random"])
def test_stochastic_samplers_give_valid_tokens(models, vocabulary_size, name):
    _, ours = models
    inputs = right_padded([[2, 17, 40]], 12)
    ours.compile(sampler=name)
    try:
        assert type(ours.sampler) is type(keras_hub.samplers.get(name))  # Not greedy.
        out = np.asarray(ours.generate(inputs, stop_token_ids=None)["token_ids"])
    finally:
        ours.compile(sampler="greedy")
    np.testing.assert_array_equal(out[0, :3], [2, 17, 40])
    assert ((0 <= out) & (out < vocabulary_size)).all()


@pytest.mark.parametrize(
    "sampler, message",
    [
        (keras_hub.samplers.TopKSampler(k=0), "k must be an integer >= 1"),
        (keras_hub.samplers.TopKSampler(k=10**7), "k=10000000 is more than the vocabulary's"),
        (keras_hub.samplers.TopPSampler(p=1.5), r"p must be in \(0, 1\]"),
        (keras_hub.samplers.TopPSampler(p=0.0), r"p must be in \(0, 1\]"),
        (keras_hub.samplers.RandomSampler(temperature=0.0), "temperature must be a finite number >= 1e-06"),
        (keras_hub.samplers.RandomSampler(temperature=float("inf")), "temperature must be a finite number >= 1e-06"),
        (keras_hub.samplers.TopKSampler(k=5, temperature="hot"), "temperature must be a finite number >= 1e-06"),
        # Logits / 1e-39 overflow float32: generation returned the prompt alone.
        (keras_hub.samplers.RandomSampler(temperature=1e-39), "temperature must be a finite number >= 1e-06"),
        (keras_hub.samplers.BeamSampler(num_beams=0), "num_beams must be an integer >= 1"),
        (keras_hub.samplers.ContrastiveSampler(k=3, alpha=2.0), r"alpha must be in \[0, 1\]"),
        # generate() failed with a shape error on every backend.
        (keras_hub.samplers.BeamSampler(num_beams=2, return_all_beams=True), "return_all_beams=True is not supported"),
    ],
)
def test_bad_sampler_arguments_are_rejected(models, sampler, message):
    _, ours = models
    before = ours.sampler
    with pytest.raises(ValueError, match=message):
        ours.compile(sampler=sampler)
    assert ours.sampler is before  # The model keeps the sampler it had.


def test_sampler_numbers_may_be_numpy_or_backend_scalars(models):
    _, ours = models
    try:
        ours.compile(sampler=keras_hub.samplers.TopKSampler(k=np.int64(1), seed=0))
        assert ours.sampler.k == 1
        for temperature in (np.array(0.7), np.float32(0.7), keras.ops.convert_to_tensor(0.7)):
            ours.compile(sampler=keras_hub.samplers.TopPSampler(p=np.float64(0.9), temperature=temperature))
    finally:
        ours.compile(sampler="greedy")


def test_prompt_longer_than_max_length_is_rejected(gemma_lm):
    with pytest.raises(ValueError, match="too long for the sequence length"):
        gemma_lm.generate("The quick brown fox jumps over the lazy dog", max_length=6)
    with pytest.raises(ValueError, match="max_length=1 leaves no room: generation needs at least 2 positions"):
        gemma_lm.generate("hello", max_length=1)  # It said "at most -1 tokens fit".


def test_a_zero_dimensional_array_is_one_prompt(gemma_lm):
    """np.array("hello") failed with a bare IndexError deep in generation."""
    expected = gemma_lm.generate("hello", max_length=12)
    assert gemma_lm.generate(np.array("hello"), max_length=12) == expected
    assert gemma_lm.generate(np.array(b"hello"), max_length=12) == expected


def test_generating_past_the_trained_context_warns(gemma_lm):
    context = gemma_lm.backbone.context_length
    stop_anywhere = list(range(gemma_lm.backbone.vocabulary_size))  # One new token.
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        gemma_lm.generate("hello", max_length=context, stop_token_ids=stop_anywhere)
    message = f"max_length={context + 1} is past the {context} tokens"
    with pytest.warns(UserWarning, match=message):
        gemma_lm.generate("hello", max_length=context + 1, stop_token_ids=stop_anywhere)
    with pytest.warns(UserWarning, match=message):
        next(stream_text(gemma_lm, "hello", max_length=context + 1))


def test_a_prompt_that_leaves_no_room_is_rejected(gemma_lm, models):
    """A prompt filling max_length came back unchanged, nothing generated
    and nothing said (KerasHub's behaviour); one token of room generates."""
    prompt = "hello world"
    length = gemma_lm.preprocessor.prompt_token_count(prompt)
    with pytest.raises(ValueError, match=f"at most {length - 2} tokens fit in max_length={length} .*room for one new token"):
        gemma_lm.generate(prompt, max_length=length, stop_token_ids=None)
    out = gemma_lm.generate(prompt, max_length=length + 1, stop_token_ids=None, strip_prompt=True)
    assert out != ""
    _, ours = models  # Token ids whose every row is full.
    full = {"token_ids": np.array([[2, 17, 40]], "int32"), "padding_mask": np.ones((1, 3), "int32")}
    with pytest.raises(ValueError, match="no room for new tokens: every row's padding_mask is all ones"):
        ours.generate(full, stop_token_ids=None)
    one_row_full = right_padded([[2, 17, 40], [2, 17]], 3)
    out = ours.generate(one_row_full, stop_token_ids=None)
    np.testing.assert_array_equal(np.asarray(out["padding_mask"]), np.ones((2, 3)))


def test_max_new_tokens_gives_each_prompt_that_many_tokens(gemma_lm):
    """transformers' `max_new_tokens`: a short and a long prompt in one batch
    each get (at most) that many new tokens, the text generate() gives
    each alone with the matching max_length."""
    prompts = ["hello", "The quick brown fox jumps over"]
    counts = gemma_lm.preprocessor.prompt_token_counts(prompts)
    assert counts == [gemma_lm.preprocessor.prompt_token_count(p) for p in prompts]
    assert counts[1] > counts[0] + 2
    batch = gemma_lm.generate(prompts, max_new_tokens=4, stop_token_ids=None)
    for prompt, count, text in zip(prompts, counts, batch):
        assert text == gemma_lm.generate(prompt, max_length=count + 4, stop_token_ids=None)
    new = gemma_lm.generate(prompts, max_new_tokens=4, stop_token_ids=None, strip_prompt=True)
    assert new == [text[len(prompt):] for prompt, text in zip(prompts, batch)]
    assert gemma_lm.generate("hello", max_new_tokens=4, stop_token_ids=None) == batch[0]


def test_max_new_tokens_of_token_ids(models):
    """Without a preprocessor: later positions keep their padding (0) and
    leave the padding mask; the width stays the token ids'."""
    _, ours = models
    inputs = right_padded([[2, 17, 40, 99, 23], [2, 250]], 12)
    out = ours.generate(inputs, max_new_tokens=3, stop_token_ids=None)
    token_ids, mask = np.asarray(out["token_ids"]), np.asarray(out["padding_mask"]).astype(bool)
    assert token_ids.shape == (2, 12)
    np.testing.assert_array_equal(mask.sum(axis=-1), [5 + 3, 2 + 3])
    free = np.asarray(ours.generate(inputs, stop_token_ids=None)["token_ids"])
    np.testing.assert_array_equal(token_ids[mask], free[mask])
    assert not token_ids[~mask].any()
    # Room past the width: it grows to the longest prompt's limit.
    out = ours.generate(right_padded([[2, 17, 40]], 4), max_new_tokens=5, stop_token_ids=None)
    expected = ours.generate(right_padded([[2, 17, 40]], 8), stop_token_ids=None)
    np.testing.assert_array_equal(np.asarray(out["token_ids"]), np.asarray(expected["token_ids"]))


def test_max_new_tokens_bad_uses_are_clear_errors(gemma_lm):
    import tensorflow as tf

    with pytest.raises(ValueError, match="Pass max_length .* or max_new_tokens .*, not both"):
        gemma_lm.generate("hello", max_length=12, max_new_tokens=4)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_new_tokens must be a positive whole number"):
            gemma_lm.generate("hello", max_new_tokens=bad)
    dataset = tf.data.Dataset.from_tensor_slices(["hello", "hi"]).batch(2)
    with pytest.raises(ValueError, match="max_new_tokens counts the prompts' tokens first.*tf.data.Dataset"):
        gemma_lm.generate(dataset, max_new_tokens=4)
    with pytest.raises(ValueError, match="Pass max_length .* or max_new_tokens .*, not both"):
        next(stream_text(gemma_lm, "hello", max_length=12, max_new_tokens=4))
    with pytest.raises(ValueError, match="max_new_tokens must be a positive whole number"):
        next(stream_text(gemma_lm, "hello", max_new_tokens=0))


def test_streamed_max_new_tokens(gemma_lm):
    prompt = "The quick brown fox"
    text = "".join(stream_text(gemma_lm, prompt, max_new_tokens=5, stop_token_ids=None))
    count = gemma_lm.preprocessor.prompt_token_count(prompt)
    assert prompt + text == gemma_lm.generate(prompt, max_length=count + 5, stop_token_ids=None)


def test_stop_token_ids_take_any_sequence_of_ints(models):
    _, ours = models
    inputs = right_padded([[2, 17, 40]], 12)
    free = np.asarray(ours.generate(inputs, stop_token_ids=None)["token_ids"])
    stop = int(free[0, 5])
    as_list = np.asarray(ours.generate(inputs, stop_token_ids=[stop])["padding_mask"])
    as_array = np.asarray(ours.generate(inputs, stop_token_ids=np.array([stop]))["padding_mask"])
    np.testing.assert_array_equal(as_array, as_list)
    assert not as_list.all()  # It stopped.
    # No stop tokens at all, like None.
    np.testing.assert_array_equal(np.asarray(ours.generate(inputs, stop_token_ids=[])["token_ids"]), free)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"stop_token_ids": 1}, "list of token ids"),
        ({"stop_token_ids": ["<eos>"]}, "token_to_id"),
        ({"stop_token_ids": "eos"}, "list of token ids"),
        ({"stop_token_ids": [1, 10**6]}, r"stop_token_ids \[1000000\] are not token ids of this model's vocabulary"),
        ({"stop_token_ids": [-1]}, r"stop_token_ids \[-1\] are not token ids"),
        ({"max_length": 0}, "max_length must be a positive whole number"),
        ({"max_length": -5}, "max_length must be a positive whole number"),
        ({"max_length": 2.5}, "max_length must be a positive whole number"),
        ({"max_length": True}, "max_length must be a positive whole number"),  # Was 1.
        # Killed for memory (21 GB within minutes), with no error.
        ({"max_length": 10**12}, r"max_length=1000000000000 needs a KV cache of .* GiB for 1 prompt\(s\), more than this machine's"),
    ],
)
def test_bad_generate_arguments_are_clear_errors(gemma_lm, kwargs, message):
    with pytest.raises(ValueError, match=message):
        gemma_lm.generate("hello", **kwargs)


def test_bad_token_inputs_are_clear_errors(models):
    """Ids outside the vocabulary (padding too) gave NaN-poisoned rows on
    JAX and an IndexError on PyTorch; a missing padding_mask a KeyError, a
    1-D row an IndexError."""
    _, ours = models
    inputs = right_padded([[2, 17, 40], [2, 9]], 8)
    vocabulary_size = ours.backbone.vocabulary_size
    cases = [
        ({**inputs, "token_ids": np.where(inputs["padding_mask"] == 1, inputs["token_ids"], vocabulary_size)},
         rf"token_ids \(padding too; pad with 0\) must be token ids in \[0, {vocabulary_size}\), got {vocabulary_size}"),
        ({**inputs, "token_ids": inputs["token_ids"] - 3}, r"must be token ids in \[0, \d+\), got -1"),
        ({"token_ids": inputs["token_ids"]}, "needs a padding_mask beside token_ids"),
        ({key: value[0] for key, value in inputs.items()}, r"token_ids of shape \[batch, length\]; got shape \(8,\)"),
        # Were generated from, the result float ids (5.5 kept).
        ({**inputs, "token_ids": inputs["token_ids"] + 0.5}, "token_ids as integers; got float64"),
        # New tokens wrapped (315 became 59 in uint8) and decoding went on from them.
        ({**inputs, "token_ids": inputs["token_ids"].astype("uint8")},
         rf"token_ids of dtype uint8, which cannot hold this model's token ids \(up to {vocabulary_size - 1}\); pass int32"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            ours.generate(bad, stop_token_ids=None)


def test_token_id_batches_are_checked_from_datasets_too(models):
    """Checked for dicts, not for tf.data batches: left-padded rows and ids
    outside the vocabulary generated garbage silently; unbatched datasets
    and mismatched shapes gave an IndexError or were broadcast."""
    import tensorflow as tf

    _, ours = models
    inputs = right_padded([[2, 17, 40], [2, 9]], 8)

    def dataset(token_ids, padding_mask, batch=2):
        data = tf.data.Dataset.from_tensor_slices({"token_ids": token_ids, "padding_mask": padding_mask})
        return data.batch(batch) if batch else data

    left_padded = {key: value[:, ::-1].copy() for key, value in inputs.items()}
    too_large = np.where(inputs["padding_mask"] == 1, inputs["token_ids"], 0)
    too_large[0, 1] = ours.backbone.vocabulary_size
    cases = [
        (dataset(**left_padded), "right-padded"),
        (dataset(too_large, inputs["padding_mask"]), r"must be token ids in \[0, \d+\)"),
        (dataset(**inputs, batch=None), r"of shape \[batch, length\]"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            ours.generate(bad, stop_token_ids=None)
    with pytest.raises(ValueError, match="they must have the same shape"):
        ours.generate({**inputs, "padding_mask": inputs["padding_mask"][:1]}, stop_token_ids=None)
    with pytest.raises(ValueError, match="they must have the same shape"):
        ours.generate({**inputs, "padding_mask": inputs["padding_mask"][:, :5]}, stop_token_ids=None)


def test_unbatched_string_dataset_is_a_clear_error(gemma_lm):
    import tensorflow as tf

    with pytest.raises(ValueError, match=r"single examples.*dataset.batch\(4\)"):
        gemma_lm.generate(tf.data.Dataset.from_tensor_slices(["hello", "hi"]))


def test_no_prompts_is_a_clear_error(gemma_lm):
    with pytest.raises(ValueError, match="empty list of prompts"):
        gemma_lm.generate([])


def test_prompts_that_are_not_text_are_clear_errors(gemma_lm):
    """KerasHub's tokenizer error (with its arguments quoted) or, for a
    bytes prompt, an IndexError; a dict without "prompts" went to the
    tokenizer too."""
    cases = [
        (None, "generate() takes a prompt (a string), a list of prompts or {'prompts': [...]}; got NoneType None"),
        (123, "got int 123"),
        (["hello", 1], "generate()'s prompts must be strings; got int 1"),
        ({"prompt": "hello"}, "takes {'prompts': ...} alone, got keys ['prompt']"),
    ]
    for prompts, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            gemma_lm.generate(prompts, max_length=12)
    assert gemma_lm.generate(b"hello", max_length=12) == gemma_lm.generate("hello", max_length=12)


def test_sampler_names_in_any_case_and_unknown_ones_listed(models):
    _, ours = models
    try:
        ours.compile(sampler="Top_K")
        assert isinstance(ours.sampler, keras_hub.samplers.TopKSampler)
        with pytest.raises(ValueError, match="Unknown sampler 'nope'; use one of greedy, top_k, top_p"):
            ours.compile(sampler="nope")
        with pytest.raises(ValueError, match=r"sampler must be a name \(greedy, top_k"):
            ours.compile(sampler=42)
    finally:
        ours.compile(sampler="greedy")


def test_a_sampler_changed_after_compile_is_checked_when_generating(gemma_lm):
    """Its `k` set to 0 failed deep in the loop ("argmax of an empty
    sequence" on JAX); a temperature of 0, or a bad sampler assigned to the
    model, returned the prompt alone."""
    sampler = keras_hub.samplers.TopKSampler(k=5, seed=1)
    gemma_lm.compile(sampler=sampler)
    sampler.k = 0
    with pytest.raises(ValueError, match="k must be an integer >= 1, got 0"):
        gemma_lm.generate("hello", max_length=12)
    sampler.k, sampler.temperature = 5, 0
    with pytest.raises(ValueError, match="temperature must be a finite number >= 1e-06, got 0"):
        gemma_lm.generate("hello", max_length=12)
    gemma_lm.sampler = keras_hub.samplers.TopPSampler(p=2.0)
    with pytest.raises(ValueError, match=r"p must be in \(0, 1\], got 2.0"):
        gemma_lm.generate("hello", max_length=12)


def test_a_sampler_changed_after_generating_is_the_one_used(gemma_lm):
    """JAX and TensorFlow kept the compiled function, with the old `k` in
    it, when a sampler's settings changed or another was assigned."""
    gemma_lm.compile(sampler="greedy")
    greedy = gemma_lm.generate(["hello", "the quick"], max_length=16)
    sampler = keras_hub.samplers.TopKSampler(k=50, seed=1)
    gemma_lm.compile(sampler=sampler)
    sampled = gemma_lm.generate(["hello", "the quick"], max_length=16)
    assert sampled != greedy  # Random weights: a flat distribution.
    sampler.k = 1  # Top-1 is greedy.
    assert gemma_lm.generate(["hello", "the quick"], max_length=16) == greedy
    gemma_lm.sampler = "top_k"  # Assigned by name, not through compile().
    gemma_lm.generate("hello", max_length=16)
    assert isinstance(gemma_lm.sampler, keras_hub.samplers.TopKSampler)


def test_prompts_in_keras_hub_gemma3_form(gemma_lm):
    """KerasHub's Gemma 3 takes `{"prompts": [...]}` (ours failed in the
    tokenizer); what it adds (responses, images) is a clear error."""
    prompts = ["hello", "hello world"]
    expected = gemma_lm.generate(prompts, max_length=12)
    assert gemma_lm.generate({"prompts": prompts}, max_length=12) == expected
    with pytest.raises(ValueError, match=r"takes \{'prompts': ...\} alone, got keys \['prompts', 'responses'\]"):
        gemma_lm.generate({"prompts": prompts, "responses": ["a", "b"]})


def test_logits_shape(models, vocabulary_size):
    _, ours = models
    inputs = right_padded([[2, 17, 40]], 5)
    assert tuple(keras.ops.shape(ours(inputs))) == (1, 5, vocabulary_size)


def test_default_stop_tokens_come_from_the_preprocessor_config(models, tokenizer, tmp_path):
    _, ours = models
    # Find what greedy generation produces, then declare one such token a
    # stop token in the configuration: "auto" generation must end there.
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor(tokenizer, sequence_length=20)
    gemma_lm = keras_gemma.GemmaCausalLM(ours.backbone, preprocessor)
    free = gemma_lm.generate("hello", max_length=20, stop_token_ids=None)
    prompt_ids = list(np.asarray(tokenizer("hello")))
    generated = list(np.asarray(tokenizer(free)))[len(prompt_ids):]
    stop_piece = tokenizer.id_to_token(int(generated[2]))
    assert stop_piece not in ("<eos>", "<pad>", "<bos>")  # Seed 1 gives a plain piece.
    assert preprocessor.stop_token_ids == [tokenizer.end_token_id]
    preprocessor.stop_tokens = ["<eos>", stop_piece]
    stopped = gemma_lm.generate("hello", max_length=20)
    assert len(stopped) < len(free) and free.startswith(stopped)
    # The setting is configuration: it survives save_to_preset.
    gemma_lm.save_to_preset(str(tmp_path))
    restored = keras_gemma.GemmaCausalLM.from_preset(str(tmp_path))
    assert restored.preprocessor.stop_tokens == ["<eos>", stop_piece]
    # None at all: to max_length, as stop_token_ids=None (it crashed).
    preprocessor.stop_tokens = []
    assert gemma_lm.generate("hello", max_length=20) == free
    preprocessor.stop_tokens = ["<not_a_piece>"]
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        gemma_lm.generate("hello", max_length=20)


def test_fit_reshuffles_in_memory_data_every_epoch(monkeypatch, recwarn):
    """KerasHub sliced in-memory data in order every epoch, and Keras warned
    that shuffle=True was ignored."""
    gemma_lm = keras_gemma.GemmaCausalLM(
        keras_gemma.GemmaBackbone(vocabulary_size=64, **helpers.TINY_MQA), preprocessor=None
    )
    gemma_lm.compile(optimizer="sgd", run_eagerly=True)
    tokens = helpers.random_token_ids(64, (6, 5))
    tokens[:, 1] = np.arange(6) + 10  # Each row named by its second token.
    x = {"token_ids": tokens, "padding_mask": np.ones_like(tokens)}
    seen, train_step = [], type(gemma_lm).train_step

    def recording(self, *args):  # (data), or on JAX (state, data).
        seen.extend(int(i) - 10 for i in keras.ops.convert_to_numpy(args[-1][0]["token_ids"])[:, 1])
        return train_step(self, *args)

    monkeypatch.setattr(type(gemma_lm), "train_step", recording)
    keras.utils.set_random_seed(3)
    gemma_lm.fit(x, tokens, batch_size=2, epochs=3, verbose=0)
    epochs = [seen[i : i + 6] for i in range(0, 18, 6)]
    assert all(sorted(epoch) == list(range(6)) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) > 1 and epochs[0] != list(range(6))
    assert not [w for w in recwarn if "shuffle" in str(w.message)]
    # shuffle="batch" was not shuffled at all, and Keras warned.
    seen.clear()
    gemma_lm.fit(x, tokens, batch_size=2, epochs=3, shuffle="batch", verbose=0)
    epochs = [seen[i : i + 6] for i in range(0, 18, 6)]
    assert all(sorted(epoch) == list(range(6)) for epoch in epochs) and len({tuple(epoch) for epoch in epochs}) > 1
    assert not [w for w in recwarn if "shuffle" in str(w.message)]
    # shuffle=False keeps the order.
    seen.clear()
    gemma_lm.fit(x, tokens, batch_size=2, epochs=1, shuffle=False, verbose=0)
    assert seen == list(range(6))
    # validation_split takes the last examples, as Keras, before shuffling.
    seen.clear()
    gemma_lm.fit(x, tokens, batch_size=2, epochs=1, validation_split=1 / 3, verbose=0)
    assert sorted(seen) == list(range(4))


def test_validation_split_of_strings_and_instruction_data(tokenizer):
    """KerasHub's splitter refused Python lists ("arrays only")."""
    gemma_lm = keras_gemma.GemmaCausalLM(
        keras_gemma.GemmaBackbone(vocabulary_size=tokenizer.vocabulary_size(), **helpers.TINY_MQA),
        keras_gemma.GemmaCausalLMPreprocessor(tokenizer, sequence_length=12),
    )
    gemma_lm.compile(optimizer="sgd")
    texts = ["hello world", "the quick brown fox", "hello again", "a b c"]
    data = {"prompts": ["hello", "1 2", "the", "a"], "responses": ["world", "3 4", "fox", "b"]}
    # With shuffle=False the lists went to KerasHub's splitter as they were.
    for shuffle in (True, False):
        history = gemma_lm.fit(texts, batch_size=2, validation_split=0.25, shuffle=shuffle, verbose=0).history
        assert history["val_loss"][0] > 0
        history = gemma_lm.fit(data, batch_size=2, validation_split=0.5, shuffle=shuffle, verbose=0).history
        assert history["val_loss"][0] > 0
    # The last examples validate: without shuffling, training on the first
    # three alone gives the same weights.
    weights = [w.numpy() for w in gemma_lm.trainable_weights]
    gemma_lm.compile(optimizer="sgd")
    gemma_lm.fit(texts, batch_size=3, validation_split=0.25, shuffle=False, verbose=0)
    split = [w.numpy() for w in gemma_lm.trainable_weights]
    for variable, value in zip(gemma_lm.trainable_weights, weights):
        variable.assign(value)
    gemma_lm.compile(optimizer="sgd")
    gemma_lm.fit(texts[:3], batch_size=3, shuffle=False, verbose=0)
    for a, b in zip(split, gemma_lm.trainable_weights):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-6, atol=1e-7)


def test_a_saved_compiled_model_loads_compiled_as_saved(tmp_path):
    gemma_lm = keras_gemma.GemmaCausalLM(
        keras_gemma.GemmaBackbone(vocabulary_size=64, **helpers.TINY_MQA), preprocessor=None
    )
    gemma_lm.compile(
        optimizer=keras.optimizers.SGD(0.123, momentum=0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        sampler=keras_hub.samplers.TopKSampler(k=7, temperature=0.5, seed=3),
    )
    tokens = helpers.random_token_ids(64, (2, 9))
    x = {"token_ids": tokens[:, :-1], "padding_mask": np.ones_like(tokens[:, :-1])}
    gemma_lm.fit(x, tokens[:, 1:], verbose=0)
    gemma_lm.save(tmp_path / "model.keras")

    loaded = keras.models.load_model(tmp_path / "model.keras")
    # Before: KerasHub's default Adam, holding the SGD's learning rate.
    assert isinstance(loaded.optimizer, keras.optimizers.SGD)
    assert loaded.optimizer.momentum == 0.5
    np.testing.assert_allclose(float(loaded.optimizer.learning_rate), 0.123, rtol=1e-6)
    assert int(loaded.optimizer.iterations) == 1
    assert isinstance(loaded.loss, keras.losses.SparseCategoricalCrossentropy)
    # And the sampler (it was greedy).
    assert isinstance(loaded.sampler, keras_hub.samplers.TopKSampler)
    assert (loaded.sampler.k, loaded.sampler.temperature, loaded.sampler.seed) == (7, 0.5, 3)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded(x)), keras.ops.convert_to_numpy(gemma_lm(x)), atol=1e-6
    )
    # Both take the same next step.
    expected = gemma_lm.train_on_batch(x, tokens[:, 1:])
    np.testing.assert_allclose(loaded.train_on_batch(x, tokens[:, 1:]), expected, rtol=1e-5)
    # The default (greedy) sampler saves and loads too; an optimizer that
    # never trained loads without Keras' "Skipping variable loading for
    # optimizer 'adam', because it has 84 variables whereas the saved
    # optimizer has 2 variables".
    gemma_lm.compile()
    gemma_lm.save(tmp_path / "greedy.keras")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        reloaded = keras.models.load_model(tmp_path / "greedy.keras")
    assert type(reloaded.sampler) is type(gemma_lm.sampler)
    assert int(reloaded.optimizer.iterations) == 0
    reloaded.train_on_batch(x, tokens[:, 1:])  # It builds when it first trains.
    assert int(reloaded.optimizer.iterations) == 1


def test_clone_model_and_from_config_keep_what_they_can(tmp_path):
    gemma_lm = keras_gemma.GemmaCausalLM(
        keras_gemma.GemmaBackbone(vocabulary_size=64, **helpers.TINY_MQA), preprocessor=None
    )
    gemma_lm.compile(optimizer="sgd", sampler=keras_hub.samplers.TopKSampler(k=7, seed=3))
    tokens = helpers.random_token_ids(64, (2, 9))
    x = {"token_ids": tokens[:, :-1], "padding_mask": np.ones_like(tokens[:, :-1])}
    # Keras clones any functional subclass into a plain `Functional` (as
    # KerasHub's) and compiles it from our compile config, which held the
    # sampler: "compile() got an unexpected keyword argument 'sampler'".
    clone = keras.models.clone_model(gemma_lm)
    assert clone.compiled and isinstance(clone.optimizer, keras.optimizers.SGD)
    assert np.isfinite(clone.train_on_batch(x, tokens[:, 1:])[0])
    # `from_config` keeps the sampler.
    copy = keras_gemma.GemmaCausalLM.from_config(gemma_lm.get_config())
    assert isinstance(copy.sampler, keras_hub.samplers.TopKSampler)
    assert (copy.sampler.k, copy.sampler.seed) == (7, 3)
    copy.set_weights(gemma_lm.get_weights())
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(copy(x)), keras.ops.convert_to_numpy(gemma_lm(x))
    )
    # Files saved before kept the sampler and the optimizer's state in the
    # compile config: they still load as saved.
    older = dict(gemma_lm.get_compile_config())
    older.update(sampler=keras.saving.serialize_keras_object(gemma_lm.sampler), optimizer_built=False)
    copy.compile_from_config(older)
    assert isinstance(copy.optimizer, keras.optimizers.SGD) and not copy.optimizer.built
    assert (copy.sampler.k, copy.sampler.seed) == (7, 3)
    # A saved sampler that cannot be used (settings now refused, a class
    # not registered here): the model loads, greedy, with a warning.
    older.update(sampler=keras.saving.serialize_keras_object(keras_hub.samplers.BeamSampler(return_all_beams=True)))
    with pytest.warns(UserWarning, match="return_all_beams=True is not supported.*generates greedily"):
        copy.compile_from_config(older)
    assert type(copy.sampler) is keras_gemma.models.samplers.GreedySampler
    config = gemma_lm.get_config()
    config["sampler"] = {**config["sampler"], "class_name": "MyTopK", "registered_name": "MyTopK"}
    with pytest.warns(UserWarning, match="MyTopK.*generates greedily"):
        assert type(keras_gemma.GemmaCausalLM.from_config(config).sampler) is keras_gemma.models.samplers.GreedySampler


def test_in_memory_texts_are_not_padded_to_the_longest():
    """fit() turns lists of texts into arrays (for shuffling and splitting):
    a fixed-width string array padded every text to the longest one."""
    from keras_gemma.models.gemma_causal_lm import _strings_as_arrays

    texts = ["a"] * 999 + ["b" * 100_000]
    assert _strings_as_arrays(texts).nbytes < 100_000  # Fixed-width: 400 MB.
    assert _strings_as_arrays({"prompts": texts, "responses": texts})["prompts"].nbytes < 100_000
