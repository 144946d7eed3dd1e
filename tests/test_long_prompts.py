"""Long prompts: a prefill longer than `attention.QUERY_BLOCK` is attended
in blocks of queries, each over the keys it can see, with the same results."""

import keras
import numpy as np
import pytest

import keras_gemma
from keras_gemma.layers import attention
from tests import helpers
from tests.test_presets import randomize_weights

VOCABULARY = 96
WINDOW = 4
SLIDING = dict(
    helpers.TINY_MQA, num_layers=3, sliding_window=WINDOW,
    layer_types=["sliding", "global", "sliding"], use_query_key_norm=True,
    use_sandwich_norms=True,
)


def tiny_lm():
    backbone = keras_gemma.GemmaBackbone(vocabulary_size=VOCABULARY, **SLIDING)
    randomize_weights(backbone, 0)
    return keras_gemma.GemmaCausalLM(backbone, preprocessor=None)


def prompts(lengths, max_length):
    token_ids = np.zeros((len(lengths), max_length), "int32")
    rng = np.random.default_rng(0)
    for row, length in enumerate(lengths):
        token_ids[row, :length] = rng.integers(3, VOCABULARY, length)
    padding_mask = np.arange(max_length) < np.array(lengths)[:, None]
    return {"token_ids": token_ids, "padding_mask": padding_mask}


def record_attended_shapes(monkeypatch):
    """`[(queries, keys)]` of every `_attend` call from now on."""
    shapes = []
    attend = attention.GemmaAttention._attend

    def recorded(self, query, key, value, mask, training):
        shapes.append((query.shape[1], key.shape[1], self.sliding_window))
        return attend(self, query, key, value, mask, training)

    monkeypatch.setattr(attention.GemmaAttention, "_attend", recorded)
    return shapes


@pytest.mark.parametrize("start", [0, 5])
def test_a_long_chunk_is_attended_in_blocks_of_queries_over_the_keys_they_see(start, monkeypatch):
    """A 30-token chunk through the cache with blocks of 8 queries: each
    block attends over at most the ring and its window's new keys (sliding
    layers) or the keys up to its last query (global layers), and the hidden
    states and cache equal attending the whole chunk at once (and the
    uncached forward pass)."""
    backbone = tiny_lm().backbone
    inputs = prompts([start + 30], start + 30)
    token_ids = inputs["token_ids"]
    max_length = start + 34

    def prefill():
        cache = backbone.empty_cache(1, max_length)
        if start:
            _, cache = backbone.call_with_cache(token_ids[:, :start], cache, 0)
        return backbone.call_with_cache(token_ids[:, start:], cache, start)

    whole, whole_cache = prefill()
    monkeypatch.setattr(attention, "QUERY_BLOCK", 8, raising=False)
    shapes = record_attended_shapes(monkeypatch)
    blocked, blocked_cache = prefill()
    shapes = [s for s in shapes if s[0] > 1 and (start == 0 or s[0] != start)]
    assert shapes and max(queries for queries, _, _ in shapes) == 8
    for queries, keys, window in shapes:
        if window is None:
            assert keys <= start + 32
        else:
            assert keys <= WINDOW + (WINDOW - 1) + queries
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(blocked), keras.ops.convert_to_numpy(whole), rtol=1e-5, atol=1e-5
    )
    for ours, theirs in zip(keras.tree.flatten(blocked_cache), keras.tree.flatten(whole_cache)):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(ours), keras.ops.convert_to_numpy(theirs), rtol=1e-5, atol=1e-5
        )
    full = backbone({"token_ids": token_ids, "padding_mask": inputs["padding_mask"]})
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(blocked), keras.ops.convert_to_numpy(full)[:, start:], rtol=1e-4, atol=1e-4
    )


def test_generate_from_long_prompts_gives_the_same_tokens_in_blocks(monkeypatch):
    """Compiled generate() of prompts longer than a query block (one row
    much shorter than the other) gives the tokens of unblocked attention,
    and each row the tokens it gets alone."""
    inputs = prompts([37, 5], 45)
    whole = np.asarray(tiny_lm().generate(inputs, stop_token_ids=None)["token_ids"])
    monkeypatch.setattr(attention, "QUERY_BLOCK", 8, raising=False)
    gemma_lm = tiny_lm()
    blocked = np.asarray(gemma_lm.generate(inputs, stop_token_ids=None)["token_ids"])
    np.testing.assert_array_equal(blocked, whole)
    for row in range(2):
        alone = {key: value[row:row + 1] for key, value in inputs.items()}
        np.testing.assert_array_equal(
            np.asarray(gemma_lm.generate(alone, stop_token_ids=None)["token_ids"]), whole[row:row + 1]
        )
