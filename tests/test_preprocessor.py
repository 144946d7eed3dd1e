import keras
import numpy as np
import pytest

import keras_gemma


@pytest.fixture
def preprocessor(tokenizer):
    return keras_gemma.GemmaCausalLMPreprocessor(tokenizer, sequence_length=12)


def test_training_packing_labels_and_weights(preprocessor, tokenizer):
    x, y, sample_weight = preprocessor(["hello world"])
    ids = list(np.asarray(tokenizer("hello world")))
    packed = [2] + ids + [1]
    n = len(packed)
    assert n <= 12
    token_ids = np.asarray(x["token_ids"])[0]
    np.testing.assert_array_equal(token_ids[:n], packed)
    np.testing.assert_array_equal(token_ids[n:], 0)
    np.testing.assert_array_equal(np.asarray(x["padding_mask"])[0], [1] * n + [0] * (12 - n))
    # Labels are the inputs shifted by one; weights cover real targets only.
    np.testing.assert_array_equal(np.asarray(y)[0][: n - 1], packed[1:])
    np.testing.assert_array_equal(np.asarray(sample_weight)[0], [1] * (n - 1) + [0] * (13 - n))


def test_generate_preprocess_adds_bos_not_eos(preprocessor, tokenizer):
    x = preprocessor.generate_preprocess(["hello", "hello world"])
    ids = list(np.asarray(tokenizer("hello")))
    token_ids = np.asarray(x["token_ids"])
    np.testing.assert_array_equal(token_ids[0, : len(ids) + 1], [2] + ids)
    assert 1 not in token_ids[0]
    assert np.asarray(x["padding_mask"])[0].sum() == len(ids) + 1


def test_generation_prompt_longer_than_sequence_length_is_rejected(preprocessor):
    with pytest.raises(ValueError, match="too long for the sequence length.*max_length"):
        preprocessor.generate_preprocess(["the quick brown fox jumps over the lazy dog"])


@pytest.mark.parametrize("pipeline", ["eager", "tf.data"])
def test_a_truncated_text_is_not_trained_to_end_at_the_cut(preprocessor, pipeline):
    """Its last label is the <eos> the packer put after the cut (KerasHub
    trains on it: the model learns to stop mid-text); whole texts keep it."""
    texts = ["the quick brown fox jumps over the lazy dog", "hello"]
    with pytest.warns(UserWarning, match="truncated"):
        if pipeline == "eager":
            x, y, sample_weight = preprocessor(texts)
        else:
            import tensorflow as tf

            batch = tf.data.Dataset.from_tensor_slices(texts).batch(2).map(preprocessor)
            x, y, sample_weight = next(iter(batch))
    y, sample_weight = np.asarray(y), np.asarray(sample_weight).astype(bool)
    assert np.asarray(x["token_ids"]).shape == (2, 12)
    assert y[0, -1] == 1 and not sample_weight[0, -1]  # The cut's <eos>.
    assert sample_weight[0, :-1].all()
    assert 1 in y[1][sample_weight[1]]  # The whole text's <eos> is a target.


def test_training_truncation_warns_inside_tf_data_once(preprocessor):
    """In fit()'s tf.data pipeline it was printed for every batch of every
    epoch (thousands of lines)."""
    import warnings

    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices(["the quick brown fox jumps over the lazy dog"] * 6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's: once per place.
        for _ in range(2):  # Two epochs of 3 batches.
            for _ in ds.batch(2).map(preprocessor):
                pass
    assert [str(w.message) for w in caught if "truncated" in str(w.message)] == [
        next(str(w.message) for w in caught if "truncated" in str(w.message))
    ]


def test_prompts_always_start_with_bos(tokenizer):
    """With add_start_token=False (for training data) a prompt filling
    max_length passed the length check, then lost its last token to <bos>."""
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor(tokenizer, sequence_length=12, add_start_token=False)
    prompt = "hello world"
    ids = list(np.asarray(tokenizer(prompt)))
    assert preprocessor.prompt_token_count(prompt) == len(ids) + 1
    x = preprocessor.generate_preprocess([prompt], sequence_length=len(ids) + 2)
    np.testing.assert_array_equal(np.asarray(x["token_ids"])[0], [2] + ids + [0])
    with pytest.raises(ValueError, match="too long for the sequence length"):
        preprocessor.generate_preprocess([prompt], sequence_length=len(ids) + 1)


def test_each_input_is_tokenized_once(preprocessor):
    # The length checks read the same tokens that are packed.
    calls = []
    tokenize = preprocessor.tokenizer.tokenize
    preprocessor.tokenizer.tokenize = lambda inputs: calls.append(inputs) or tokenize(inputs)
    try:
        preprocessor(["hello world"])
        assert len(calls) == 1
        preprocessor.generate_preprocess(["hello"])
        assert len(calls) == 2
        preprocessor({"prompts": ["hello"], "responses": ["world"]})
        assert len(calls) == 4  # The prompts, then the responses.
    finally:
        del preprocessor.tokenizer.tokenize


def test_one_stop_token_string_is_one_piece(tokenizer):
    """Not its characters, which are tokens too and would end generation
    at the first such letter."""
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor(tokenizer, stop_tokens="<eos>")
    assert preprocessor.stop_tokens == ["<eos>"]
    assert preprocessor.stop_token_ids == [tokenizer.end_token_id]
    preprocessor.stop_tokens = "<pad>"
    assert preprocessor.stop_token_ids == [tokenizer.pad_token_id]
    preprocessor.stop_tokens = ("<eos>", "<pad>")
    assert preprocessor.stop_token_ids == [tokenizer.end_token_id, tokenizer.pad_token_id]
    assert preprocessor.get_config()["stop_tokens"] == ["<eos>", "<pad>"]


@pytest.mark.parametrize("length", [0, -3, 2.5, None, "8"])
def test_sequence_length_must_be_a_positive_whole_number(tokenizer, length):
    message = "sequence_length must be a positive whole number of tokens"
    with pytest.raises(ValueError, match=message):
        keras_gemma.GemmaCausalLMPreprocessor(tokenizer, sequence_length=length)
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor(tokenizer, sequence_length=np.int64(8))
    assert preprocessor.sequence_length == 8
    with pytest.raises(ValueError, match=message):
        preprocessor.sequence_length = length
    assert preprocessor.sequence_length == 8


def test_stop_tokens_none_means_none(tokenizer):
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor(tokenizer, stop_tokens=None)
    assert preprocessor.stop_tokens == [] and preprocessor.stop_token_ids == []
    preprocessor.stop_tokens = np.array(["<eos>", "<end_of_turn>"])
    assert preprocessor.stop_token_ids == [1, tokenizer.end_of_turn_id]


def test_a_preprocessor_saved_alone_is_not_taken_for_a_model(preprocessor, tmp_path):
    preprocessor.save_to_preset(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="preprocessor's `save_to_preset` alone writes no model"):
        keras_gemma.GemmaCausalLM.from_preset(str(tmp_path))


def test_tokenizing_after_a_seed_is_set(tokenizer, preprocessor):
    """`keras.utils.set_random_seed` clears TensorFlow's kernel caches and
    tf_text's SentencePiece resource with them: tokenizing afterwards (in
    `fit()` on texts, the usual notebook order) failed with "Resource
    .../SentencepieceOp... does not exist"."""
    import tensorflow as tf

    expected = keras.ops.convert_to_numpy(tokenizer("hello world"))
    for _ in range(2):  # Each new seed clears them again.
        keras.utils.set_random_seed(0)
        # First in a tf.data trace (as `fit()` on texts), then in another.
        for _ in range(2):
            dataset = tf.data.Dataset.from_tensor_slices(["hello world"]).map(tokenizer)
            np.testing.assert_array_equal(next(iter(dataset)).numpy(), expected)
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(tokenizer("hello world")), expected)
        assert tokenizer.detokenize(expected) == "hello world"
    x, _, _ = preprocessor(["hello world"])
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(x["token_ids"])[0, 1 : 1 + len(expected)], expected)
