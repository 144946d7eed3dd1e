import contextlib
import functools
import gc
import math
import numbers
import warnings

import keras
import numpy as np
from keras import ops
from keras_hub.models import Backbone

from keras_gemma.checkpoints import loading
from keras_gemma.checkpoints.loading import CatalogPresets
from keras_gemma.layers.decoder_block import GemmaDecoderBlock
from keras_gemma.layers.dense import adapters_merged_on_save
from keras_gemma.layers.dense import config_or_weight_only
from keras_gemma.layers.dense import merges_adapters_on_save
from keras_gemma.layers.dense import rebuilds_from_its_dtype_policy
from keras_gemma.layers.dense import recorded_config
from keras_gemma.layers.dense import saved_quantization_configs
from keras_gemma.layers.block_tracing import call_block_traced_once
from keras_gemma.layers.block_tracing import call_block_traced_once_tf
from keras_gemma.layers.direct_call import dynamo_is_tracing
from keras_gemma.layers.direct_call import tensorflow_is_tracing
from keras_gemma.layers.embedding import EmbeddingScale
from keras_gemma.layers.embedding import ReversibleEmbedding
from keras_gemma.layers.rms_normalization import RMSNormalization
from keras_gemma.models import layout_map
from keras_gemma.presets import context_length
from keras_gemma.staging import check_free_space
from keras_gemma.staging import staged_preset

LAYER_TYPES = ("global", "sliding")


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaBackbone(CatalogPresets, Backbone):
    """The Gemma decoder stack, config-driven across Gemma 1, 2 and 3 (text).

    Takes `{"token_ids", "padding_mask"}` (both `[batch, seq]`) and returns the
    final hidden states `[batch, seq, hidden_dim]`. The families differ only in
    the arguments below; see `keras_gemma.presets` for the published configs.

    Args:
        vocabulary_size: rows of the (tied) token embedding.
        num_layers: number of decoder blocks.
        num_query_heads: attention query heads.
        num_key_value_heads: key/value heads (1 = multi-query attention).
        hidden_dim: model width D.
        intermediate_dim: width of each feed-forward gate (Hugging Face's
            `intermediate_size`; KerasHub's Gemma 1/2 configs store twice this).
        head_dim: width of one attention head; `heads * head_dim` may differ
            from `hidden_dim` (Gemma 7B).
        query_scale: queries are multiplied by `query_scale ** -0.5`.
            `None` means `head_dim` (Gemma 2 27B uses 144, Gemma 3 27B 168).
        attention_logit_soft_cap: `tanh(s / cap) * cap` on attention scores
            (Gemma 2: 50). `None` disables it.
        final_logit_soft_cap: the same on output logits (Gemma 2: 30).
        sliding_window: window W of the sliding layers: query q sees key k
            when `q - W < k <= q`.
        layer_types: one of `"global"` / `"sliding"` per layer. `None` means
            all global.
        use_sandwich_norms: also normalize the attention and feed-forward
            outputs (Gemma 2/3).
        use_query_key_norm: RMS-normalize queries and keys per head before
            RoPE (Gemma 3).
        rope_max_wavelength: RoPE base of the global layers.
        local_rope_max_wavelength: RoPE base of the sliding layers. `None`
            means `rope_max_wavelength`.
        rope_scaling_factor: linear RoPE scaling of the global layers (their
            inverse frequencies are divided by it; Gemma 3 4B+: 8).
        layer_norm_epsilon: RMSNorm epsilon.
        dropout: dropout rate for training.
        dtype: dtype or `keras.DTypePolicy` (e.g. `"bfloat16"`,
            `"mixed_bfloat16"`). Norms and softmax always compute in float32.

    Example:
    ```python
    backbone = keras_gemma.GemmaBackbone(
        vocabulary_size=1000, num_layers=2, num_query_heads=4,
        num_key_value_heads=1, hidden_dim=64, intermediate_dim=128, head_dim=16,
    )
    hidden = backbone({
        "token_ids": np.array([[2, 7, 9, 0]]),
        "padding_mask": np.array([[1, 1, 1, 0]]),
    })
    ```
    """

    def __init__(
        self,
        vocabulary_size,
        num_layers,
        num_query_heads,
        num_key_value_heads,
        hidden_dim,
        intermediate_dim,
        head_dim,
        query_scale=None,
        attention_logit_soft_cap=None,
        final_logit_soft_cap=None,
        sliding_window=None,
        layer_types=None,
        use_sandwich_norms=False,
        use_query_key_norm=False,
        rope_max_wavelength=10000.0,
        local_rope_max_wavelength=None,
        rope_scaling_factor=1.0,
        layer_norm_epsilon=1e-6,
        dropout=0.0,
        dtype=None,
        quantization_configs=None,
        **kwargs,
    ):
        # Keras' functional Model drops keyword arguments it does not know:
        # reject them here so that a misspelt config key is not ignored.
        unknown = sorted(set(kwargs) - {"name", "trainable"})
        if unknown:
            raise TypeError(f"GemmaBackbone got unexpected arguments {unknown}.")
        sizes = dict(
            vocabulary_size=vocabulary_size, num_layers=num_layers, num_query_heads=num_query_heads,
            num_key_value_heads=num_key_value_heads, hidden_dim=hidden_dim,
            intermediate_dim=intermediate_dim, head_dim=head_dim,
        )
        for name, value in sizes.items():  # Else Keras' or NumPy's errors, or no layers at all.
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GemmaBackbone: {name} must be a whole number >= 1, got {value!r}.")
        layer_types = list(layer_types or ["global"] * num_layers)
        _check_layer_types(layer_types, num_layers, sliding_window)

        # A quantized model's configs that its dtype policies do not give
        # (see `get_config`), for its layers as they are built.
        with saved_quantization_configs(quantization_configs):
            # === Layers ===
            self.token_embedding = ReversibleEmbedding(
                input_dim=vocabulary_size,
                output_dim=hidden_dim,
                tie_weights=True,
                embeddings_initializer=keras.initializers.VarianceScaling(
                    scale=1.0, mode="fan_in", distribution="untruncated_normal"
                ),
                logit_soft_cap=final_logit_soft_cap,
                dtype=dtype,
                name="token_embedding",
            )
            self.embedding_scale = EmbeddingScale(
                hidden_dim, dtype=dtype, name="embedding_scale"
            )
            self.trace_blocks_once = False  # Set by `TorchCompiledStep` (PyTorch).
            self.transformer_layers = []
            for i, layer_type in enumerate(layer_types):
                sliding = layer_type == "sliding"
                attention_config = dict(
                    num_query_heads=num_query_heads,
                    num_key_value_heads=num_key_value_heads,
                    head_dim=head_dim,
                    query_scale=query_scale,
                    logit_soft_cap=attention_logit_soft_cap,
                    sliding_window=sliding_window if sliding else None,
                    use_query_key_norm=use_query_key_norm,
                    rope_max_wavelength=(
                        (local_rope_max_wavelength or rope_max_wavelength)
                        if sliding
                        else rope_max_wavelength
                    ),
                    # Linear RoPE scaling applies to global layers only.
                    rope_scaling_factor=1.0 if sliding else rope_scaling_factor,
                )
                self.transformer_layers.append(
                    GemmaDecoderBlock(
                        intermediate_dim=intermediate_dim,
                        attention_config=attention_config,
                        use_sandwich_norms=use_sandwich_norms,
                        layer_norm_epsilon=layer_norm_epsilon,
                        dropout=dropout,
                        dtype=dtype,
                        name=f"decoder_block_{i}",
                    )
                )
            self.layer_norm = RMSNormalization(
                layer_norm_epsilon, dtype=dtype, name="final_normalization"
            )

            # === Functional model ===
            token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
            padding_mask = keras.Input(shape=(None,), dtype="int32", name="padding_mask")
            x = self.embed(token_ids)
            for block in self.transformer_layers:
                x = block(x, padding_mask=padding_mask)
            outputs = self.layer_norm(x)
            super().__init__(
                inputs={"token_ids": token_ids, "padding_mask": padding_mask},
                outputs=outputs,
                dtype=dtype,
                **kwargs,
            )
        if isinstance(self.dtype_policy, keras.dtype_policies.DTypePolicyMap):
            give_layers_their_own_policies(self)

        # === Config ===
        self.vocabulary_size = vocabulary_size
        self.num_layers = num_layers
        self.num_query_heads = num_query_heads
        self.num_key_value_heads = num_key_value_heads
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.head_dim = head_dim
        self.query_scale = query_scale
        self.attention_logit_soft_cap = attention_logit_soft_cap
        self.final_logit_soft_cap = final_logit_soft_cap
        self.sliding_window = sliding_window
        self.layer_types = layer_types
        self.use_sandwich_norms = use_sandwich_norms
        self.use_query_key_norm = use_query_key_norm
        self.rope_max_wavelength = rope_max_wavelength
        self.local_rope_max_wavelength = local_rope_max_wavelength
        self.rope_scaling_factor = rope_scaling_factor
        self.layer_norm_epsilon = layer_norm_epsilon
        self.dropout = dropout
        weight_only_int8_by_default(self)

    def embed(self, token_ids):
        """Scaled token embeddings, the input of the first decoder block."""
        return self.embedding_scale(self.token_embedding(token_ids))

    def token_logits(self, hidden_states):
        """Logits over the vocabulary from final hidden states (tied
        embedding, final soft-cap when configured)."""
        return self.token_embedding(hidden_states, reverse=True)

    def empty_cache(self, batch_size, max_length):
        """A zeroed KV cache: one `(key, value)` pair per layer, each
        `[batch, slots, num_key_value_heads, head_dim]` with
        `slots = max_length` on global layers and
        `min(sliding_window, max_length)` on sliding layers (a ring buffer)."""
        for name, value in (("batch_size", batch_size), ("max_length", max_length)):
            if isinstance(value, int) and value < 1:  # Traced sizes pass.
                raise ValueError(f"empty_cache: {name} must be at least 1, got {value}.")
        cache = []
        for block in self.transformer_layers:
            shape = (batch_size, _cache_slots(block, max_length), self.num_key_value_heads, self.head_dim)
            zeros = ops.zeros(shape, self.compute_dtype)
            cache.append((zeros, zeros))
        return tuple(cache)

    @property
    def context_length(self):
        """The tokens (prompt and generated) that the released Gemma models
        of this architecture were trained on: 8192 for Gemma 1 and 2, 32768
        for Gemma 3 270M and 1B, 131072 for Gemma 3 4B and larger."""
        return context_length(
            {"use_query_key_norm": self.use_query_key_norm, "rope_scaling_factor": self.rope_scaling_factor}
        )

    def cache_bytes(self, batch_size, max_length):
        """The bytes of `empty_cache(batch_size, max_length)`."""
        itemsize = np.dtype(keras.backend.standardize_dtype(self.compute_dtype)).itemsize
        slots = sum(_cache_slots(block, max_length) for block in self.transformer_layers)
        return 2 * batch_size * slots * self.num_key_value_heads * self.head_dim * itemsize

    def call_with_cache(
        self, token_ids, cache, cache_update_index, cache_write_end=None, left_padding=None
    ):
        """Forward `token_ids` `[batch, T]` sitting at positions
        `cache_update_index ...`, reading and updating `cache`.

        Returns `(hidden_states, cache)`. Cache positions before
        `cache_update_index` must hold the keys/values of the tokens there.
        Positions from `cache_write_end` on are computed but not stored in
        the sliding layers' ring buffers (they will be fed again).
        `left_padding` `[batch]`: each row's tokens start that many columns
        late (prompts aligned at their ends); the indices above are then
        columns, and row `r`'s column `c` is position `c - left_padding[r]`.
        """
        if not dynamo_is_tracing():
            self._check_cache_room(token_ids, cache, cache_update_index)
        x = self.embed(token_ids)
        updated_cache = []
        trace_once = self.trace_blocks_once and cache_write_end is None and dynamo_is_tracing()
        trace_once_tf = tensorflow_is_tracing()
        for block, layer_cache in zip(self.transformer_layers, cache):
            if trace_once:  # PyTorch's decode step (see `TorchCompiledStep`).
                x, layer_cache = call_block_traced_once(
                    block, x, layer_cache, cache_update_index, left_padding
                )
            elif trace_once_tf:
                x, layer_cache = call_block_traced_once_tf(
                    block, x, layer_cache, cache_update_index, cache_write_end, left_padding,
                    # Set in __dict__: kept out of Keras' and TensorFlow's tracking.
                    self.__dict__.setdefault("_tf_block_functions", {}),
                )
            else:
                x, layer_cache = block(
                    x,
                    cache=layer_cache,
                    cache_update_index=cache_update_index,
                    cache_write_end=cache_write_end,
                    left_padding=left_padding,
                    training=False,  # Inference (and no call context to resolve).
                )
            updated_cache.append(layer_cache)
        return self.layer_norm(x), tuple(updated_cache)

    def _check_cache_room(self, token_ids, cache, cache_update_index):
        """Writes past a global layer's cache were clamped into its last
        slots: wrong logits, no error. Checked where the sizes are known
        (eager calls; traced ones pass)."""
        length = token_ids.shape[1]
        if not isinstance(cache_update_index, (int, np.integer)) or not isinstance(length, int):
            return
        end = int(cache_update_index) + length
        for block, (key, _) in zip(self.transformer_layers, cache):
            slots, window = key.shape[1], block.attention.sliding_window
            # A ring buffer that holds the whole window wraps around instead.
            bounded = window is None or slots < window
            if bounded and isinstance(slots, int) and end > slots:
                raise ValueError(
                    f"call_with_cache: tokens at positions {int(cache_update_index)}"
                    f"..{end - 1} do not fit a cache of {slots} positions; make "
                    f"it with empty_cache(batch_size, max_length={end}) or more."
                )

    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        """Load a backbone from a catalog name, a `kaggle://`/`hf://` handle
        or a preset directory (ours, or written by KerasHub's
        `GemmaBackbone.save_to_preset`)."""
        return loading.load_backbone(cls, preset, load_weights, **kwargs)

    def save_to_preset(self, preset_dir, max_shard_size=10):
        """KerasHub's preset layout. LoRA adapters, if enabled, are folded
        into the kernels (a preset loads without LoRA, in KerasHub too); a
        `.keras` file or `save_lora_weights` keeps them apart."""
        check_savable(self, max_shard_size, preset_dir)
        with staged_preset(preset_dir) as staging, adapters_merged_on_save():
            super().save_to_preset(staging, max_shard_size=max_shard_size)

    @classmethod
    def from_config(cls, config):
        """A backbone from `get_config()`; with LoRA enabled if the config
        records it (a `.keras` file saved with LoRA enabled)."""
        config = dict(config)
        lora = config.pop("lora", None)
        backbone = super().from_config(config)
        if lora is not None:
            backbone.enable_lora(**lora)
        return backbone

    def save_own_variables(self, store):
        """Keras' weight saving (`.keras`, `save_weights`, presets), with a
        warning where it merges LoRA adapters into quantized kernels."""
        adapted = [layer.path for layer in self._flatten_layers()
                   if layer.quantization_mode and getattr(layer, "lora_enabled", False)]
        if adapted and merges_adapters_on_save():
            warnings.warn(
                f"Saving merges the LoRA adapters of {len(adapted)} quantized layers "
                "into their kernels and requantizes them: changes smaller than a "
                "quantization step round away (see `merge_lora`). Save the "
                "adapters on their own with `save_lora_weights(path)` to keep "
                "them exactly.",
                stacklevel=2,
            )
        super().save_own_variables(store)

    @property
    def trainable(self):
        return self._trainable

    @trainable.setter
    def trainable(self, value):
        """Keras' setter, applied to every layer inside too: on TensorFlow,
        attribute tracking skips `layer.trainable = x` where the layer is
        already `x`, so frozen layers holding trainable ones (as
        `enable_lora` leaves the blocks) passed nothing on: after
        `enable_lora`, `trainable = False` left the adapters trainable on
        TensorFlow only, and `True` left the query/value kernels frozen."""
        for layer in self._flatten_layers():
            keras.layers.Layer.trainable.fset(layer, value)

    def get_config(self):
        config = super().get_config()
        policy = self.dtype_policy
        quantized = [layer for layer in self._flatten_layers() if layer.quantization_mode]
        if quantized and not isinstance(policy, keras.dtype_policies.DTypePolicyMap):
            # KerasHub's map of the quantized layers' policies records no
            # source dtype when Keras quantized with a config (always, for
            # weight-only int8) and leaves the other layers to floatx: a
            # bfloat16 model would come back computing in float32.
            policy_map = keras.dtype_policies.DTypePolicyMap(policy.name)
            for layer in quantized:
                policy_map[layer.path] = f"{layer.quantization_mode}_from_{policy.name}"
            config["dtype"] = keras.dtype_policies.serialize(policy_map)
        # Configs a layer's dtype policy does not give (activations
        # quantized too, an int4 block size other than 128): the layer
        # would come back otherwise (a .keras file reloaded weight-only,
        # or failed to load).
        recorded = {layer.path: recorded_config(layer) for layer in quantized}
        recorded = {path: c for path, c in recorded.items() if c is not None}
        if recorded:
            config["quantization_configs"] = recorded
        if not merges_adapters_on_save():  # See `from_config`.
            from keras_gemma import lora

            config["lora"] = lora.lora_config(self)
            if config["lora"] is None:
                del config["lora"]
        return {
            **config,
            "vocabulary_size": self.vocabulary_size,
            "num_layers": self.num_layers,
            "num_query_heads": self.num_query_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "hidden_dim": self.hidden_dim,
            "intermediate_dim": self.intermediate_dim,
            "head_dim": self.head_dim,
            "query_scale": self.query_scale,
            "attention_logit_soft_cap": self.attention_logit_soft_cap,
            "final_logit_soft_cap": self.final_logit_soft_cap,
            "sliding_window": self.sliding_window,
            "layer_types": self.layer_types,
            "use_sandwich_norms": self.use_sandwich_norms,
            "use_query_key_norm": self.use_query_key_norm,
            "rope_max_wavelength": self.rope_max_wavelength,
            "local_rope_max_wavelength": self.local_rope_max_wavelength,
            "rope_scaling_factor": self.rope_scaling_factor,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "dropout": self.dropout,
        }

    def quantize(self, *args, **kwargs):
        """Keras' `Model.quantize`, with one garbage collection at the end.

        `"int8"` without a `config` is weight-only (see
        `weight_only_int8_by_default`).

        Keras runs a full `gc.collect()` each time a layer deletes its float
        kernel; with JAX, TensorFlow and PyTorch imported each takes ~0.3 s,
        37 of the 42 s that quantizing gemma3_270m took on JAX.
        """
        with _one_garbage_collection(), warnings.catch_warnings():
            # Norms and the like have nothing to quantize: not worth a warning.
            warnings.filterwarnings("ignore", message="Layer .* does not have a `quantize`")
            super().quantize(*args, **kwargs)
        if getattr(self, "_lora_saved_state", None) is not None:  # After enable_lora.
            from keras_gemma import lora

            lora.hold_embedding_inputs_quantizer(self)

    @staticmethod
    def get_layout_map(device_mesh, model_parallel_dim_name="model", data_parallel_dim_name="batch", config=None):
        """A `keras.distribution.LayoutMap` that shards the weights over
        `device_mesh` (KerasHub's layouts: heads and the MLP's inner
        dimension over the model axis, the model dimension over the data
        axis), for `keras.distribution.ModelParallel` (JAX):

        ```python
        mesh = keras.distribution.DeviceMesh(
            (1, 2), ("batch", "model"), keras.distribution.list_devices())
        layout_map = GemmaBackbone.get_layout_map(mesh, config="gemma3_1b")
        keras.distribution.set_distribution(keras.distribution.ModelParallel(
            layout_map=layout_map, batch_dim_name="batch"))
        gemma_lm = GemmaCausalLM.from_preset("gemma3_1b")
        ```

        `config` (a catalog name or a backbone config) names the model the
        map is for: then a dimension the mesh axis does not divide stays
        whole (Gemma 2B's and Gemma 3 1B's single key/value head on two or
        more model devices: without `config`, as in KerasHub, JAX refuses
        to load them). Float, int8 and int4 models: for int4 pass the
        quantized model's own config (`get_config()` after
        `quantize("int4")`, or its preset's config.json), whose dtype
        policies say which kernels Keras stores packed, in 2-D."""
        return layout_map.get_layout_map(device_mesh, model_parallel_dim_name, data_parallel_dim_name, config)

    # === LoRA (implemented in keras_gemma/lora.py) ===

    def default_lora_layer_names(self):
        """The projections `enable_lora` targets by default: query, value."""
        from keras_gemma import lora

        return list(lora.DEFAULT_TARGETS)

    def enable_lora(self, rank, target_layer_names=None, alpha=None):
        """Freeze the backbone and add trainable LoRA adapters.

        Each targeted `EinsumDense` computes with `W + (alpha / rank) * A @ B`
        (Keras' `EinsumDense.enable_lora`; `A`, `B` float32, `B` starts at
        zero). Call it before `compile()`. Works on quantized models too
        (`quantize("int8")` first, for QLoRA-style training). With a config
        that rounds activations too, an int8 output embedding reads float
        hidden states while LoRA is enabled, as that rounding would stop
        every gradient.

        Args:
            rank: positive int, the adapters' rank.
            target_layer_names: `None` for `["query", "value"]`; `"all"` for
                every projection; or a list of names from `"query"`,
                `"key"`, `"value"`, `"attention_output"`, `"ffw_gating"`
                (gate), `"ffw_gating_2"` (up), `"ffw_linear"` (down).
            alpha: the adapters are scaled by `alpha / rank`; `None` means
                `rank` (a scale of 1).
        """
        from keras_gemma import lora

        lora.enable_lora(self, rank, target_layer_names, alpha)

    def save_lora_weights(self, filepath):
        """Write the adapters with their rank, alpha and target names to
        `filepath` (`.safetensors`, or `.h5` such as `adapters.lora.h5`)."""
        from keras_gemma import lora

        lora.save_lora_weights(self, filepath)

    def load_lora_weights(self, filepath):
        """Load adapters written by `save_lora_weights` (on any backend).

        Enables LoRA with the file's rank, alpha and targets when it is not
        enabled yet; otherwise those must match. Raises `ValueError` when the
        file was saved from a model of another shape. Also reads the
        `.lora.h5` files of KerasHub's `Backbone.save_lora_weights`."""
        from keras_gemma import lora

        lora.load_lora_weights(self, filepath)

    def merge_lora(self):
        """Fold the adapters into the kernels and remove them: the model
        computes the same outputs with plain kernels (requantized ones for
        int8/int4 models, with a warning: changes smaller than a
        quantization step are lost), has no LoRA variables, and its layers are as
        trainable as before `enable_lora`. Compile again before training."""
        from keras_gemma import lora

        lora.merge_lora(self)


def give_layers_their_own_policies(backbone):
    """Layers built with a `DTypePolicyMap` (the dtype of a quantized
    preset) hold the whole map and look their own policy up by path, except
    in Keras' int8/int4 weight saving, which reads the map's float default
    and fails ("Invalid dtype: object"). Each gets its own policy instead."""
    for layer in backbone._flatten_layers(include_self=False):
        policy_map = layer._dtype_policy
        if isinstance(policy_map, keras.dtype_policies.DTypePolicyMap):
            # As Keras looks it up; a layer without a path gets the default.
            policy = policy_map[layer.path] if layer.path else policy_map.default_policy
            layer._dtype_policy = policy


def check_savable(backbone, max_shard_size=10, preset_dir=None):
    """Refuse to save what a preset cannot restore, with a shard size (in
    GB) that is not a positive number, or to a disk without room for the
    weights (and 16 MiB for the tokenizer and configs), before writing a
    file.

    A quantized preset records each layer's dtype policy and, for int8 and
    int4, its quantization config where the policy does not give it (see
    `get_config`); other modes' configs are not recorded.
    """
    if max_shard_size is not None and (  # None: one file, as KerasHub's.
        isinstance(max_shard_size, bool) or not isinstance(max_shard_size, numbers.Real) or not max_shard_size > 0
    ):
        raise ValueError(f"max_shard_size is in GB and must be a number > 0 (or None), got {max_shard_size!r}.")
    different = [layer.path for layer in backbone._flatten_layers()
                 if layer.quantization_mode and not rebuilds_from_its_dtype_policy(layer)
                 and recorded_config(layer) is None]
    if different:
        raise ValueError(
            f"Cannot save this model: {len(different)} quantized layers (e.g. "
            f"{different[0]!r}) use a quantization mode whose config a preset "
            "does not record (only int8's and int4's). Save the float model "
            "and quantize it after loading."
        )
    if preset_dir is not None:
        weights_bytes = sum(
            math.prod(v.shape) * np.dtype(keras.backend.standardize_dtype(v.dtype)).itemsize
            for v in backbone.weights
        )
        check_free_space(preset_dir, weights_bytes + 2**24, "the preset")


def weight_only_int8_by_default(model):
    """Make `model.quantize("int8")` without a `config` weight-only.

    Keras wraps every layer's `quantize` (in `Layer.__new__`) so that a
    missing config becomes the mode's default before the method runs; for
    int8 that default also quantizes the activations (int8 x int8
    products), so the method itself cannot tell "no config" apart. This
    wraps Keras' wrapper instead. `config=Int8QuantizationConfig()` still
    gives Keras' default.

    Keras' wrapper also locks the model's attributes when it ends, which a
    built functional model otherwise is not: `gemma_lm.preprocessor = ...`
    then failed with "ValueError: None". The lock is put back as it was.
    """
    keras_quantize = model.quantize

    @functools.wraps(keras_quantize)
    def quantize(mode=None, config=None, **kwargs):
        if isinstance(config, str):  # Keras' older spelling: config="int8".
            mode, config = config, None
        was_locked = model._tracker.locked
        try:
            return keras_quantize(mode, config=config_or_weight_only(mode, config), **kwargs)
        finally:
            if not was_locked:
                model._tracker.unlock()

    model.quantize = quantize


@contextlib.contextmanager
def _one_garbage_collection():
    """Skip `gc.collect()` calls inside the block (from any thread); collect
    once after it."""
    collect = gc.collect
    gc.collect = lambda generation=2: 0
    try:
        yield
    finally:
        gc.collect = collect
        collect()


def _cache_slots(block, max_length):
    """A layer's cache length: `max_length`, or its sliding window's ring."""
    window = block.attention.sliding_window
    return max_length if window is None else min(window, max_length)


def _check_layer_types(layer_types, num_layers, sliding_window):
    if len(layer_types) != num_layers:
        raise ValueError(
            f"layer_types has {len(layer_types)} entries but num_layers is "
            f"{num_layers}; give one of {LAYER_TYPES} per layer."
        )
    unknown = sorted(set(layer_types) - set(LAYER_TYPES))
    if unknown:
        raise ValueError(
            f"Unknown layer types {unknown}; each must be one of {LAYER_TYPES}."
        )
    if "sliding" in layer_types and not sliding_window:
        raise ValueError(
            "layer_types has sliding layers but sliding_window is not set; "
            "pass sliding_window=<window size in tokens>."
        )
