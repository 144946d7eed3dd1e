"""Per-layer KV caches: `(key_cache, value_cache)`, each `[B, S, K, H]`.

Global layers keep every position (`S = max_length`, slot = position).
Sliding layers keep only the last `S = min(window, max_length)` positions in
a ring buffer (slot = position % S), so a 32k-token Gemma 3 context costs a
512-slot cache on its local layers. Both updates return the keys/values the
new queries attend over, with their absolute positions (negative = empty
slot), and the updated cache.
"""

from keras import ops


def update_full_cache(cache, key, value, start_index):
    """Write the new keys/values at `start_index...`; attend over the whole
    cache (slots past the queries are masked as future positions)."""
    key_cache, value_cache = cache
    start = [0, start_index, 0, 0]
    key_cache = ops.slice_update(key_cache, start, ops.cast(key, key_cache.dtype))
    value_cache = ops.slice_update(value_cache, start, ops.cast(value, value_cache.dtype))
    positions = ops.arange(ops.shape(key_cache)[1])
    return key_cache, value_cache, positions, (key_cache, value_cache)


def update_ring_cache(cache, key, value, start_index, write_end=None):
    """Ring buffer update for `T` new tokens at positions `start_index...`.

    One token stored as it comes (every decode step) writes its one slot;
    anything else takes `update_ring_cache_with_chunk`.
    """
    if write_end is None and key.shape[1] == 1:
        return update_ring_cache_with_token(cache, key, value, start_index)
    return update_ring_cache_with_chunk(cache, key, value, start_index, write_end)


def update_ring_cache_with_token(cache, key, value, start_index):
    """Write one token into its slot (`start_index % S`) and attend over the
    ring: it then holds the last `S` positions, which is the whole sliding
    window (`S = window`) or every position so far (`S = max_length`)."""
    key_cache, value_cache = cache
    ring_size = key_cache.shape[1]
    slot = ops.mod(start_index, ring_size)
    start = [0, slot, 0, 0]
    key_cache = ops.slice_update(key_cache, start, ops.cast(key, key_cache.dtype))
    value_cache = ops.slice_update(value_cache, start, ops.cast(value, value_cache.dtype))
    # Slot s holds the latest position p <= start_index with p % S == s.
    positions = start_index - ops.mod(start_index - ops.arange(ring_size), ring_size)
    return key_cache, value_cache, positions, (key_cache, value_cache)


def update_ring_cache_with_chunk(cache, key, value, start_index, write_end=None):
    """Ring buffer update for `T` new tokens at positions `start_index...`.

    The queries attend over `[old ring, new keys]` (`S + T` entries): the old
    ring holds the positions just before `start_index`, which a chunk of new
    tokens would otherwise overwrite before its first queries read them.
    Each slot then keeps the latest of its positions, counting only new
    positions before `write_end` (default: all of them): `generate()`
    prefills right-padded prompts and feeds the padding positions again
    later, so writing them now would evict real tokens from the ring.
    """
    key_cache, value_cache = cache
    ring_size = key_cache.shape[1]
    num_new = ops.shape(key)[1]
    slots = ops.arange(ring_size)
    # Slot s holds the latest position p < start_index with p % S == s.
    last_old = start_index - 1
    old_positions = last_old - ops.mod(last_old - slots, ring_size)
    new_positions = ops.arange(num_new) + start_index
    keys = ops.concatenate([key_cache, ops.cast(key, key_cache.dtype)], axis=1)
    values = ops.concatenate([value_cache, ops.cast(value, value_cache.dtype)], axis=1)
    positions = ops.concatenate([old_positions, new_positions])

    # After the update slot s holds the latest position <= the last new one:
    # from the new chunk if that position is new, else the old entry.
    end = start_index + num_new
    if write_end is not None:
        end = ops.minimum(end, write_end)
    last_new = end - 1
    latest = last_new - ops.mod(last_new - slots, ring_size)
    source = ops.where(latest >= start_index, ring_size + latest - start_index, slots)
    updated = (ops.take(keys, source, axis=1), ops.take(values, source, axis=1))
    return keys, values, positions, updated
