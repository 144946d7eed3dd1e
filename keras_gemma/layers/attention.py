import keras
from keras import ops

from keras_gemma.devices import computes_on_gpu
from keras_gemma.layers.dense import EinsumDense
from keras_gemma.layers.dense import einsum
from keras_gemma.layers.direct_call import DirectCall
from keras_gemma.layers.kv_cache import update_full_cache
from keras_gemma.layers.kv_cache import update_ring_cache
from keras_gemma.layers.rms_normalization import RMSNormalization
from keras_gemma.layers.rotary_embedding import rotary_tables, rotate

# Masked scores get this value instead of -inf so that a fully masked row (a
# padding query) gives a finite uniform softmax rather than NaNs.
MASKED_SCORE = -1e30

# Queries per block when a chunk of tokens longer than this (a long
# prompt's prefill) is attended through the cache: see `_attend_in_blocks`.
QUERY_BLOCK = 1024


def compute_attention_mask(
    query_positions, key_positions, padding_mask=None, sliding_window=None
):
    """Boolean mask `[batch or 1, query, key]`: which keys each query sees.

    A query at position q sees a key at position k when `0 <= k <= q` (a
    negative position marks an empty cache slot), the key is inside the
    sliding window (`q - window < k`), and the key is not padding.
    """
    q = query_positions[:, None]
    k = key_positions[None, :]
    mask = ops.logical_and(k <= q, k >= 0)
    if sliding_window is not None:
        mask = ops.logical_and(mask, k > q - sliding_window)
    mask = mask[None, :, :]
    if padding_mask is not None:
        mask = ops.logical_and(mask, ops.cast(padding_mask, "bool")[:, None, :])
    return mask


def keys_after(key_columns, left_padding):
    """`[batch, keys]`: which key columns come at or after each row's
    `left_padding` (the padding before a row's first token is no key)."""
    left_padding = ops.cast(left_padding, ops.dtype(key_columns))
    return key_columns[None, :] >= left_padding[:, None]


def fused_attention_kernels():
    """Whether the backend computes on a GPU, where Keras'
    `dot_product_attention` has fused kernels (tests override this)."""
    return computes_on_gpu()


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaAttention(DirectCall, keras.layers.Layer):
    """Grouped-query attention with RoPE and an optional KV cache.

    Covers every Gemma text family through its arguments: multi-query (1 kv
    head), grouped and multi-head attention, `heads * head_dim != hidden_dim`,
    a configurable query scale (`query_scale ** -0.5`), attention logit
    soft-capping, sliding-window masking and QK-norm.

    Shapes: B batch, T query length, S key length, N query heads,
    K kv heads, G = N // K query heads per kv head, H head dim, D hidden dim.
    """

    def __init__(
        self,
        num_query_heads,
        num_key_value_heads,
        head_dim,
        query_scale=None,
        logit_soft_cap=None,
        sliding_window=None,
        use_query_key_norm=False,
        rope_max_wavelength=10000.0,
        rope_scaling_factor=1.0,
        layer_norm_epsilon=1e-6,
        dropout=0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if num_query_heads % num_key_value_heads:
            raise ValueError(
                f"num_query_heads ({num_query_heads}) must be a multiple of "
                f"num_key_value_heads ({num_key_value_heads})."
            )
        self.num_query_heads = num_query_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.query_scale = query_scale
        self.logit_soft_cap = logit_soft_cap
        self.sliding_window = sliding_window
        self.use_query_key_norm = use_query_key_norm
        self.rope_max_wavelength = rope_max_wavelength
        self.rope_scaling_factor = rope_scaling_factor
        self.layer_norm_epsilon = layer_norm_epsilon
        self.dropout = dropout

    def build(self, input_shape):
        hidden_dim = input_shape[-1]
        N, K, H = self.num_query_heads, self.num_key_value_heads, self.head_dim
        # Attribute and layer names follow KerasHub's Gemma layout so that
        # KerasHub weight files load without renaming.
        self.query_dense = EinsumDense(
            "btd,ndh->btnh", (None, N, H), dtype=self.dtype_policy, name="query"
        )
        self.key_dense = EinsumDense(
            "bsd,kdh->bskh", (None, K, H), dtype=self.dtype_policy, name="key"
        )
        self.value_dense = EinsumDense(
            "bsd,kdh->bskh", (None, K, H), dtype=self.dtype_policy, name="value"
        )
        self.output_dense = EinsumDense(
            "btnh,nhd->btd",
            (None, hidden_dim),
            dtype=self.dtype_policy,
            name="attention_output",
        )
        for layer in (self.query_dense, self.key_dense, self.value_dense):
            layer.build(input_shape)
        self.output_dense.build((None, None, N, H))
        if self.use_query_key_norm:
            self.query_norm = RMSNormalization(
                self.layer_norm_epsilon, dtype=self.dtype_policy, name="query_norm"
            )
            self.key_norm = RMSNormalization(
                self.layer_norm_epsilon, dtype=self.dtype_policy, name="key_norm"
            )
            self.query_norm.build((None, None, N, H))
            self.key_norm.build((None, None, K, H))
        self.dropout_layer = keras.layers.Dropout(self.dropout, dtype=self.dtype_policy)

    def call(
        self,
        x,
        padding_mask=None,
        cache=None,
        cache_update_index=0,
        cache_write_end=None,
        left_padding=None,
        training=None,
    ):
        """Attend over `x` `[B, T, D]`.

        Without a cache, `x` is a whole sequence starting at position 0. With
        `cache = (key_cache, value_cache)`, each `[B, S, K, H]`, `x` holds the
        tokens at positions `cache_update_index ...`: their keys and values
        are written into the cache, the queries attend over the cache, and
        the updated cache is returned alongside the output. With a cache,
        `left_padding` `[B]` says each row's tokens start that many columns
        late (prompts aligned at their ends): row `r`'s column `c` holds
        position `c - left_padding[r]`, and its earlier columns are masked.
        """
        query = self.query_dense(x, training=training)
        key = self.key_dense(x, training=training)
        value = self.value_dense(x, training=training)
        if self.use_query_key_norm:
            query = self.query_norm(query)
            key = self.key_norm(key)

        start_index = 0 if cache is None else cache_update_index
        rope = rotary_tables(
            start_index, ops.shape(query)[1], self.head_dim,
            self.rope_max_wavelength, self.rope_scaling_factor, query.dtype,
            left_padding=None if cache is None else left_padding,
        )
        query = rotate(query, *rope)
        key = rotate(key, *rope)
        query_positions = ops.arange(ops.shape(query)[1]) + start_index

        slots = None if cache is None else cache[0].shape[1]
        if cache is None:
            key_positions = query_positions
        elif self.sliding_window is None:
            key, value, key_positions, cache = update_full_cache(
                cache, key, value, start_index
            )
        else:
            key, value, key_positions, cache = update_ring_cache(
                cache, key, value, start_index, cache_write_end
            )
        if cache is not None:  # Columns, and only left padding is masked.
            padding_mask = None if left_padding is None else keys_after(key_positions, left_padding)
        query_length = query.shape[1]
        if cache is not None and isinstance(query_length, int) and query_length > QUERY_BLOCK:
            output = self._attend_in_blocks(
                query, key, value, query_positions, key_positions, slots, start_index,
                left_padding, training,
            )
            return self.output_dense(output, training=training), cache
        mask = compute_attention_mask(
            query_positions, key_positions, padding_mask, self.sliding_window
        )
        if cache is None and self._fuses_attention():
            output = self._attend_fused(query, key, value, mask)
        else:
            output = self._attend(query, key, value, mask, training)
        output = self.output_dense(output, training=training)
        return output if cache is None else (output, cache)

    def _fuses_attention(self):
        """Whether a whole sequence (training, scoring) is attended with
        Keras' `dot_product_attention`: on a GPU with JAX (cuDNN flash
        attention for 16-bit inputs) or PyTorch (`scaled_dot_product_attention`'s
        memory-efficient kernel), as KerasHub's Gemma does. They keep no
        `[query, key]` scores for the backward pass: less memory, and faster
        for long sequences. Not with a logit soft-cap (Gemma 2: the kernels
        have none) or dropout. TensorFlow has no such kernel: its XLA runs
        `_attend`."""
        return (
            self.logit_soft_cap is None
            and self.dropout == 0
            and keras.config.backend() in ("jax", "torch")
            and fused_attention_kernels()
        )

    def _attend_fused(self, query, key, value, mask):
        batch, query_length, _, _ = ops.shape(query)
        key_length = ops.shape(key)[1]
        mask = ops.broadcast_to(mask[:, None], (batch, 1, query_length, key_length))
        return ops.dot_product_attention(
            query, key, value, mask=mask, scale=self._query_scale() ** -0.5
        )

    def _query_scale(self):
        return self.head_dim if self.query_scale is None else self.query_scale

    def scaled_query(self, query):
        """`query * query_scale ** -0.5`, the product rounded once, as
        transformers' (PyTorch multiplies a 16-bit tensor by a Python float
        in float32): a scale rounded to bfloat16 first made every score of
        Gemma 2 27B (144 ** -0.5) 0.2% larger (KerasHub and Flax round it)."""
        scale = self._query_scale() ** -0.5
        if keras.backend.standardize_dtype(query.dtype) == "float32":
            return query * scale
        return ops.cast(ops.cast(query, "float32") * scale, query.dtype)

    def _attend_in_blocks(
        self, query, key, value, query_positions, key_positions, slots, start_index,
        left_padding, training,
    ):
        """`_attend` of a long chunk of new tokens (a prefill) through the
        cache, `QUERY_BLOCK` queries at a time, each block over only the
        keys it can see: the whole chunk at once kept `[B, N, T, S]` float32
        scores (and their softmax) for every key, most of them masked: a
        sliding layer's block sees the old ring and the new keys of its
        window, not all `T` new keys; a global layer's block (prefill from a
        known index) the keys up to its last query. The same softmax over
        the same unmasked keys (masked ones weigh exactly 0), at a fraction
        of the memory and, on sliding layers, of the work."""
        query_length, key_length = query.shape[1], key.shape[1]
        outputs = []
        for begin in range(0, query_length, QUERY_BLOCK):
            end = min(begin + QUERY_BLOCK, query_length)
            if self.sliding_window is not None:
                # `[old ring (slots), new keys]`: the ring, and the new keys
                # inside the window of the block's first query.
                first = max(0, begin - self.sliding_window + 1)
                ranges = [(0, slots), (slots + first, slots + end)]
            elif isinstance(start_index, int):  # Slot = position.
                ranges = [(0, min(key_length, start_index + end))]
            else:
                ranges = [(0, key_length)]

            def keys_of(x, axis=1):
                parts = [x[:, lo:hi] if axis == 1 else x[lo:hi] for lo, hi in ranges]
                return parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=axis)

            block_positions, block_keys = query_positions[begin:end], keys_of(key_positions, axis=0)
            padding = None if left_padding is None else keys_after(block_keys, left_padding)
            mask = compute_attention_mask(block_positions, block_keys, padding, self.sliding_window)
            outputs.append(
                self._attend(query[:, begin:end], keys_of(key), keys_of(value), mask, training)
            )
        return ops.concatenate(outputs, axis=1)

    def _attend(self, query, key, value, mask, training):
        batch, query_length, _, _ = ops.shape(query)
        K, H = self.num_key_value_heads, self.head_dim
        G = self.num_query_heads // K
        query = ops.reshape(self.scaled_query(query), (batch, query_length, K, G, H))
        scores = einsum("btkgh,bskh->bkgts", query, key)
        scores = ops.cast(scores, "float32")
        if self.logit_soft_cap is not None:
            scores = ops.tanh(scores / self.logit_soft_cap) * self.logit_soft_cap
        scores = ops.where(mask[:, None, None, :, :], scores, MASKED_SCORE)
        weights = ops.cast(ops.softmax(scores, axis=-1), value.dtype)
        if self.dropout > 0:  # No call at rate 0: less for torch.compile to trace.
            weights = self.dropout_layer(weights, training=training)
        output = einsum("bkgts,bskh->btkgh", weights, value)
        return ops.reshape(
            output, (batch, query_length, self.num_query_heads, H)
        )

    def get_config(self):
        return {
            **super().get_config(),
            "num_query_heads": self.num_query_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "query_scale": self.query_scale,
            "logit_soft_cap": self.logit_soft_cap,
            "sliding_window": self.sliding_window,
            "use_query_key_norm": self.use_query_key_norm,
            "rope_max_wavelength": self.rope_max_wavelength,
            "rope_scaling_factor": self.rope_scaling_factor,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "dropout": self.dropout,
        }
