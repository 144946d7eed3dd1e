import keras
import numpy as np
import pytest

from keras_gemma.layers.kv_cache import (
    update_ring_cache,
    update_ring_cache_with_chunk,
    update_ring_cache_with_token,
)

RING = 4
SHAPE = (2, RING, 1, 3)  # [B, S, K, H]


def attended(keys, values, positions, query_position):
    """{position: (key, value)} of the entries a query at `query_position`
    sees through the ring: non-empty, not future, inside the window."""
    keys, values = keras.ops.convert_to_numpy(keys), keras.ops.convert_to_numpy(values)
    seen = {}
    for slot, position in enumerate(keras.ops.convert_to_numpy(positions).tolist()):
        if 0 <= position <= query_position and position > query_position - RING:
            seen[position] = (keys[:, slot], values[:, slot])
    return seen


def test_one_token_update_equals_the_chunk_update():
    """Decode steps write one slot instead of rebuilding the ring: the same
    cache afterwards and the same keys/values seen, while the ring fills and
    after it wraps."""
    rng = np.random.default_rng(0)
    cache = (np.zeros(SHAPE, "float32"), np.zeros(SHAPE, "float32"))
    for position in range(3 * RING + 1):
        key = rng.normal(size=(2, 1, 1, 3)).astype("float32")
        value = rng.normal(size=(2, 1, 1, 3)).astype("float32")
        *token, token_cache = update_ring_cache_with_token(cache, key, value, position)
        *chunk, chunk_cache = update_ring_cache_with_chunk(cache, key, value, position)
        for ours, theirs in zip(token_cache, chunk_cache):
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(ours), keras.ops.convert_to_numpy(theirs))
        seen, expected = attended(*token, position), attended(*chunk, position)
        assert sorted(seen) == sorted(expected) == list(range(max(0, position - RING + 1), position + 1))
        for p in expected:
            for ours, theirs in zip(seen[p], expected[p]):
                np.testing.assert_array_equal(ours, theirs)
        cache = tuple(keras.ops.convert_to_numpy(c) for c in token_cache)


@pytest.mark.parametrize("write_end", [None, 5])
def test_ring_update_takes_the_one_slot_write_only_for_one_stored_token(write_end, monkeypatch):
    import keras_gemma.layers.kv_cache as kv_cache

    calls = []
    monkeypatch.setattr(kv_cache, "update_ring_cache_with_token", lambda *a: calls.append("token"))
    monkeypatch.setattr(kv_cache, "update_ring_cache_with_chunk", lambda *a: calls.append("chunk"))
    cache = (np.zeros(SHAPE, "float32"), np.zeros(SHAPE, "float32"))
    one, two = np.zeros((2, 1, 1, 3), "float32"), np.zeros((2, 2, 1, 3), "float32")
    update_ring_cache(cache, one, one, 6, write_end)
    update_ring_cache(cache, two, two, 6, write_end)
    # A token past `write_end` (prefill padding) must not be stored.
    assert calls == (["token", "chunk"] if write_end is None else ["chunk", "chunk"])


@pytest.mark.skipif(keras.config.backend() != "jax", reason="reads XLA's program")
def test_jax_one_token_update_writes_in_place():
    """Compiled, the one-token update is two in-place slice writes: no
    gather or concatenation of the whole ring."""
    import jax

    cache = (np.zeros(SHAPE, "float32"), np.zeros(SHAPE, "float32"))
    key = np.zeros((2, 1, 1, 3), "float32")
    update = jax.jit(lambda cache, index: update_ring_cache(cache, key, key, index)[3], donate_argnums=0)
    program = update.lower(cache, np.int32(9)).compile().as_text()
    assert program.count("dynamic-update-slice") >= 2
    assert "gather" not in program and "concatenate" not in program
