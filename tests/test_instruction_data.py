"""Instruction data, `{"prompts": [...], "responses": [...]}`: packing,
response-only loss, the chat template and fine-tuning with `fit()`."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_gemma
from tests import helpers
from tests.test_presets import randomize_weights

DATA = {"prompts": ["hello world", "the quick"], "responses": ["gemma", "brown fox"]}


def preprocessor(tokenizer, sequence_length=16, **kwargs):
    return keras_gemma.GemmaCausalLMPreprocessor(
        tokenizer, sequence_length=sequence_length, **kwargs
    )


def expected_packing(tokenizer, prompt, response, sequence_length):
    """Token ids, labels and weights of `<bos> prompt response <eos>`."""
    prompt_ids = [int(i) for i in tokenizer(prompt)]
    response_ids = [int(i) for i in tokenizer(response)]
    packed = [2] + prompt_ids + response_ids + [1]
    pad = sequence_length + 1 - len(packed)
    assert pad > 0
    packed += [0] * pad
    # Weight 1 where the target (the next token) is a response token or <eos>.
    weights = [0] * len(prompt_ids) + [1] * (len(response_ids) + 1) + [0] * pad
    return packed[:-1], packed[1:], weights


def as_numpy(outputs):
    x, y, sample_weight = outputs
    return (
        np.asarray(x["token_ids"]),
        np.asarray(x["padding_mask"]),
        np.asarray(y),
        np.asarray(sample_weight).astype("int32"),
    )


@pytest.mark.parametrize("kind", ["list", "numpy", "tf", "tf.data"])
def test_packing_ids_labels_and_weights(tokenizer, kind):
    layer = preprocessor(tokenizer)
    if kind == "tf.data":
        ds = tf.data.Dataset.from_tensor_slices(DATA).batch(2).map(layer)
        outputs = next(iter(ds))
    else:
        convert = {"list": list, "numpy": np.array, "tf": tf.constant}[kind]
        outputs = layer({key: convert(value) for key, value in DATA.items()})
    token_ids, padding_mask, y, sample_weight = as_numpy(outputs)
    for row, (prompt, response) in enumerate(zip(DATA["prompts"], DATA["responses"])):
        ids, labels, weights = expected_packing(tokenizer, prompt, response, 16)
        np.testing.assert_array_equal(token_ids[row], ids)
        np.testing.assert_array_equal(padding_mask[row], np.asarray(ids) != 0)
        np.testing.assert_array_equal(y[row], labels)
        np.testing.assert_array_equal(sample_weight[row], weights)


def test_single_example_and_plain_strings_unchanged(tokenizer):
    layer = preprocessor(tokenizer)
    token_ids, _, _, sample_weight = as_numpy(layer({"prompts": "hello", "responses": "world"}))
    ids, _, weights = expected_packing(tokenizer, "hello", "world", 16)
    np.testing.assert_array_equal(token_ids, ids)
    np.testing.assert_array_equal(sample_weight, weights)
    # Plain strings still train on every token.
    token_ids, _, _, sample_weight = as_numpy(layer(["hello world"]))
    n = len(tokenizer("hello world")) + 2
    np.testing.assert_array_equal(sample_weight[0], [1] * (n - 1) + [0] * (17 - n))


def test_overlong_example_cuts_the_response_end_and_warns(tokenizer):
    """The cut response's tokens train, the <eos> after the cut does not
    (it would teach the model to stop mid-answer); a prompt that fills the
    sequence alone trains nothing. In Python and in tf.data alike."""
    prompt, response = "hello world", "the quick brown fox jumps over the lazy dog"
    prompt_ids = [int(i) for i in tokenizer(prompt)]
    response_ids = [int(i) for i in tokenizer(response)]
    sequence_length = len(prompt_ids) + 4
    layer = preprocessor(tokenizer, sequence_length)
    data = {"prompts": [prompt, response, prompt], "responses": [response, prompt, "hello"]}
    with pytest.warns(UserWarning, match="end of the response is cut.*no loss on its <eos>"):
        eager = layer(data)
    dataset = tf.data.Dataset.from_tensor_slices(data).batch(3).map(layer)
    for outputs in (eager, next(iter(dataset))):
        token_ids, _, y, sample_weight = as_numpy(outputs)
        kept = sequence_length - 1 - len(prompt_ids)  # + 1 label, - <bos>, <eos>
        packed = [2] + prompt_ids + response_ids[:kept] + [1]
        np.testing.assert_array_equal(token_ids[0], packed[:-1])
        np.testing.assert_array_equal(y[0], packed[1:])
        np.testing.assert_array_equal(sample_weight[0], [0] * len(prompt_ids) + [1] * kept + [0])
        np.testing.assert_array_equal(y[1][-1], 1)  # The prompt is cut: <eos> only.
        assert not sample_weight[1].any()
        # An example that fits keeps its <eos> weighted.
        assert sample_weight[2].sum() == len(tokenizer("hello")) + 1 and y[2][sample_weight[2] > 0][-1] == 1


# Padded: the template trims each turn's content, as Gemma's templates do.
@pytest.mark.parametrize("pad", ["", " \n", "\u3000\xa0\x85 "])
def test_chat_template_matches_format_chat(tokenizer, pad):
    layer = preprocessor(tokenizer, 40, apply_chat_template=True)
    data = {key: [pad + text + pad for text in texts] for key, texts in DATA.items()}
    prompt, response = DATA["prompts"][0], DATA["responses"][0]
    for outputs in (
        layer(data),
        next(iter(tf.data.Dataset.from_tensor_slices(data).batch(2).map(layer))),
    ):
        token_ids, padding_mask, _, sample_weight = as_numpy(outputs)
        text = tokenizer.detokenize(token_ids[0][padding_mask[0]][1:-1])
        text = text.numpy().decode() if hasattr(text, "numpy") else text
        turns = [{"role": "user", "content": prompt}, {"role": "model", "content": response}]
        # The model's turn ends at <end_of_turn>, then <eos>.
        assert text + "\n" == keras_gemma.format_chat(turns, add_generation_prompt=False)
        assert token_ids[0][padding_mask[0]][-1] == 1
        # The loss covers `{response}<end_of_turn><eos>`.
        response_ids = tokenizer(response + "<end_of_turn>")
        assert sample_weight[0].sum() == len(response_ids) + 1
    # Generation prompts are wrapped the same way; formatted ones are not.
    chat = keras_gemma.format_chat([{"role": "user", "content": prompt}])
    x = layer.generate_preprocess([pad + prompt + pad, chat])
    token_ids = np.asarray(x["token_ids"])
    expected = [2] + [int(i) for i in tokenizer(chat)]
    np.testing.assert_array_equal(token_ids[:, : len(expected)], [expected, expected])
    assert not np.asarray(x["padding_mask"])[:, len(expected):].any()
    restored = keras_gemma.GemmaCausalLMPreprocessor.from_config(layer.get_config())
    assert restored.apply_chat_template


def test_no_examples_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="no examples"):
        preprocessor(tokenizer)({"prompts": [], "responses": []})


def test_mismatched_lengths_are_a_clear_error(tokenizer):
    layer = preprocessor(tokenizer)
    with pytest.raises(ValueError, match="`prompts` has 2 examples and `responses` has 1 example"):
        layer({"prompts": ["a", "b"], "responses": ["c"]})
    with pytest.raises(ValueError, match="has a single .* string.*same length"):
        layer({"prompts": "a", "responses": ["b"]})


@pytest.mark.parametrize(
    "data", [{"prompts": ["a"]}, {"prompts": ["a"], "responses": ["b"], "extra": ["c"]}]
)
def test_wrong_keys_are_a_clear_error(tokenizer, data):
    with pytest.raises(ValueError, match=r"keys \['prompts', 'responses'\]"):
        preprocessor(tokenizer)(data)


def test_tokenized_inputs_to_a_preprocessor_suggest_removing_it(tokenizer):
    ids = np.ones((1, 4), "int32")
    with pytest.raises(ValueError, match="preprocessor=None"):
        preprocessor(tokenizer)({"token_ids": ids, "padding_mask": ids})


@pytest.fixture
def gemma_lm(tokenizer, vocabulary_size):
    backbone = keras_gemma.GemmaBackbone(vocabulary_size=vocabulary_size, **helpers.TINY_MQA)
    randomize_weights(backbone)
    gemma_lm = keras_gemma.GemmaCausalLM(backbone, preprocessor(tokenizer))
    gemma_lm.compile(optimizer=keras.optimizers.SGD(1e-2))
    return gemma_lm


def test_loss_covers_the_response_only(gemma_lm):
    x, y, sample_weight = gemma_lm.preprocessor(DATA)
    y_pred = gemma_lm(x)
    y = keras.ops.convert_to_numpy(y)
    weights = keras.ops.convert_to_numpy(sample_weight)

    def loss(labels):
        value = gemma_lm.compute_loss(x, labels, y_pred, sample_weight=sample_weight)
        return float(keras.ops.convert_to_numpy(value))

    base = loss(y)
    vocabulary_size = gemma_lm.backbone.vocabulary_size
    # Every prompt (and padding) label changed: the same loss.
    assert ((y != 0) & ~weights).any()
    changed = np.where(weights, y, (y + 7) % vocabulary_size)
    np.testing.assert_allclose(loss(changed), base, rtol=1e-6)
    # One response label changed: a different loss.
    changed = y.copy()
    position = tuple(np.argwhere(weights)[0])
    changed[position] = (changed[position] + 7) % vocabulary_size
    assert abs(loss(changed) - base) > 1e-3


@pytest.mark.parametrize("pipeline", ["dict", "tf.data"])
def test_fit_on_instruction_data(gemma_lm, pipeline):
    if pipeline == "dict":
        history = gemma_lm.fit(x=DATA, batch_size=2, epochs=2, verbose=0)
    else:
        gemma_lm.preprocessor.apply_chat_template = True
        ds = tf.data.Dataset.from_tensor_slices(DATA).batch(2)
        history = gemma_lm.fit(ds, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))


def test_fit_with_mismatched_lengths_is_a_clear_error(gemma_lm):
    # Not tf.data's "Dimensions 2 and 1 are not compatible".
    with pytest.raises(ValueError, match="`prompts` has 2 examples and `responses` has 1 example"):
        gemma_lm.fit({"prompts": ["a", "b"], "responses": ["c"]}, batch_size=1, verbose=0)
    with pytest.raises(ValueError, match="exactly the keys \\['prompts', 'responses'\\].*got keys \\['prompts'\\]"):
        gemma_lm.fit({"prompts": ["a", "b"]}, batch_size=1, verbose=0)
    # evaluate(), predict() and validation data gave tf.data's message.
    bad, good = {"prompts": ["a", "b"], "responses": ["c"]}, {"prompts": ["a"], "responses": ["c"]}
    for call in (
        lambda: gemma_lm.evaluate(bad, verbose=0),
        lambda: gemma_lm.predict(bad, verbose=0),
        lambda: gemma_lm.fit(good, validation_data=bad, verbose=0),
        lambda: gemma_lm.fit(good, validation_data=(bad,), verbose=0),
    ):
        with pytest.raises(ValueError, match="`prompts` has 2 examples and `responses` has 1 example"):
            call()


def test_fit_on_data_that_is_not_text_is_a_clear_error(gemma_lm):
    """These failed inside tf.data (its errors wrapped in kilobytes of
    traceback text), or with TensorFlow's "buffer_size must be greater than
    zero" for no examples."""
    cases = [
        ([], "fit() got no examples: `x` is an empty list."),
        (["a", 2], "fit()'s texts must be strings; got int 2."),
        ({"prompts": ["a"], "responses": [1]}, "Instruction data's `responses` must be strings; got int 1."),
        ({"prompt": ["a"], "response": ["b"]}, "exactly the keys ['prompts', 'responses']"),
    ]
    for data, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            gemma_lm.fit(data, batch_size=1, verbose=0)


@pytest.mark.parametrize("data", [DATA, DATA["prompts"]], ids=["instructions", "strings"])
def test_unbatched_dataset_is_a_clear_error(gemma_lm, data):
    dataset = tf.data.Dataset.from_tensor_slices(data)
    with pytest.raises(ValueError, match=r"single examples.*dataset.batch\(4\)"):
        gemma_lm.fit(dataset, verbose=0)
    with pytest.raises(ValueError, match=r"single examples.*dataset.batch\(4\)"):
        gemma_lm.evaluate(dataset, verbose=0)


@pytest.mark.parametrize("method", ["fit", "evaluate"])
@pytest.mark.parametrize("data", [DATA, DATA["prompts"]], ids=["instructions", "strings"])
def test_targets_or_weights_beside_raw_inputs_are_a_clear_error(gemma_lm, method, data):
    """KerasHub drops them silently: training ignored the weights asked for."""
    call = getattr(gemma_lm, method)
    with pytest.raises(ValueError, match="`sample_weight` is not used with a preprocessor"):
        call(data, sample_weight=np.zeros(2), batch_size=2, verbose=0)
    with pytest.raises(ValueError, match="`y` is not used with a preprocessor"):
        call(data, ["a", "b"], batch_size=2, verbose=0)


def test_validation_targets_or_weights_are_a_clear_error_too(gemma_lm):
    for validation_data in ((DATA, None, np.zeros(2)), (DATA, ["a", "b"])):
        with pytest.raises(ValueError, match="is not used with a preprocessor"):
            gemma_lm.fit(DATA, validation_data=validation_data, batch_size=2, verbose=0)


@pytest.mark.parametrize("texts", [list, tuple, np.array], ids=["list", "tuple", "array"])
def test_validation_texts_as_x_takes_them(gemma_lm, texts):
    """A list of texts as `validation_data` was unpacked by Keras as
    `(x, y)`: "`y` is not used with a preprocessor", or Keras' "Data is
    expected to be in format `x`, `(x,)`..."."""
    validation = texts(["hello world", "the quick brown fox", "gemma", "jumps over"])
    history = gemma_lm.fit(DATA["prompts"], validation_data=validation, batch_size=2, verbose=0)
    expected = gemma_lm.evaluate(list(validation), batch_size=2, verbose=0, return_dict=True)["loss"]
    np.testing.assert_allclose(history.history["val_loss"][-1], expected, rtol=1e-5)


def test_tokenized_inputs_with_labels_suggest_removing_the_preprocessor(gemma_lm):
    x, y, _ = gemma_lm.preprocessor(DATA)
    for method in (gemma_lm.fit, gemma_lm.evaluate):
        with pytest.raises(ValueError, match="preprocessor=None"):
            method(x, y, batch_size=2, verbose=0)


def test_evaluate_takes_keras_hubs_positional_arguments(gemma_lm):
    """(x, y, batch_size, sample_weight) as KerasHub's evaluate."""
    loss = gemma_lm.evaluate(DATA, None, 2, None, verbose=0, return_dict=True)["loss"]
    assert np.isfinite(loss)


def test_example_weights_through_preprocessed_inputs(gemma_lm):
    """The way the error above recommends: scaled token weights, fitted
    without a preprocessor, weight each example."""
    x, y, token_weights = gemma_lm.preprocessor(DATA)
    plain = keras_gemma.GemmaCausalLM(gemma_lm.backbone, preprocessor=None)
    plain.compile(optimizer=keras.optimizers.SGD(1e-2))

    def loss(example_weights):
        weights = token_weights * np.asarray(example_weights, "float32")[:, None]
        return plain.evaluate(x, y, sample_weight=weights, verbose=0, return_dict=True)["loss"]

    assert abs(loss([1, 0]) - loss([0, 1])) > 1e-3
