import contextlib
import math
import numbers
import operator
import os
import warnings
import weakref

import keras
import keras_hub
import numpy as np
from keras import ops
from keras_hub.models import CausalLM
from keras_hub.samplers import GreedySampler as KerasHubGreedySampler
from keras_hub.samplers import Sampler
from keras_hub.src.utils.pipeline_model import _train_validation_split
from keras_hub.src.utils.tensor_utils import any_equal

from keras_gemma.checkpoints import loading
from keras_gemma.checkpoints.loading import CatalogPresets
from keras_gemma.devices import computes_on_gpu
from keras_gemma.layers.dense import lay_out_kernels_for_decoding
from keras_gemma.layers.direct_call import block_regions_available
from keras_gemma.layers.direct_call import dynamo_is_tracing
from keras_gemma.layers.direct_call import mark_blocks_for_one_trace
from keras_gemma.layers.direct_call import shorten_keras_tracing
from keras_gemma.models.gemma_backbone import GemmaBackbone
from keras_gemma.models.gemma_backbone import check_savable
from keras_gemma.models.gemma_backbone import weight_only_int8_by_default
from keras_gemma.models.gemma_causal_lm_preprocessor import INSTRUCTION_KEYS
from keras_gemma.models.gemma_causal_lm_preprocessor import GemmaCausalLMPreprocessor
from keras_gemma.models.gemma_causal_lm_preprocessor import HAS_TENSORFLOW
from keras_gemma.models.gemma_causal_lm_preprocessor import check_strings
from keras_gemma.models.gemma_causal_lm_preprocessor import instruction_columns
from keras_gemma.models.gemma_causal_lm_preprocessor import positive_token_count
from keras_gemma.models.token_loss import ACCURACIES
from keras_gemma.models.token_loss import count_predictions
from keras_gemma.models.token_loss import hidden_state_loss
from keras_gemma.models.token_loss import logits_per_chunk_of
from keras_gemma.models.token_loss import TokenAccuracy
from keras_gemma.models.token_loss import TokenCrossentropy
from keras_gemma.staging import staged_preset


TOKEN_INPUTS = ("token_ids", "padding_mask")

# Keras' dtype helpers are lru_cache'd; torch.compile traces through them
# (harmless here) and would warn on every first compile of fit or generate.
warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaCausalLM(CatalogPresets, CausalLM):
    """Gemma for next-token prediction and text generation.

    `call` maps `{"token_ids", "padding_mask"}` to logits
    `[batch, seq, vocabulary_size]`. `generate()` takes strings (with a
    preprocessor) or right-padded `{"token_ids", "padding_mask"}` (without),
    prefills a per-layer KV cache in one pass and decodes token by token.
    Choose the sampler with `compile(sampler=...)`: `"greedy"`, `"top_k"`,
    `"top_p"`, `"random"` or a `keras_hub.samplers.Sampler` (for example
    `keras_hub.samplers.TopKSampler(k=10, temperature=0.7)`).

    Example:
    ```python
    gemma_lm = keras_gemma.GemmaCausalLM.from_preset("./my_preset")
    gemma_lm.generate("The capital of France is", max_length=32)
    gemma_lm.compile(sampler="top_k")
    gemma_lm.generate(["one", "two prompts"], max_length=32)

    # LoRA fine-tuning.
    gemma_lm.backbone.enable_lora(rank=4)
    gemma_lm.compile(optimizer="adam")  # Again after enable_lora.
    gemma_lm.fit(["some text", "more text"], batch_size=2)
    ```
    """

    backbone_cls = GemmaBackbone
    preprocessor_cls = GemmaCausalLMPreprocessor

    def __init__(self, backbone, preprocessor=None, **kwargs):
        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor

        # === Functional model ===
        inputs = backbone.input
        outputs = backbone.token_logits(backbone(inputs))
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        weight_only_int8_by_default(self)

    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        """Load the model, tokenizer and preprocessor from a catalog name, a
        `kaggle://`/`hf://` handle or a preset directory (ours, or written by
        KerasHub's `GemmaCausalLM.save_to_preset`)."""
        return loading.load_task(cls, preset, load_weights, **kwargs)

    def save_to_preset(self, preset_dir, max_shard_size=10):
        check_savable(self.backbone, max_shard_size)
        with staged_preset(preset_dir) as staging:
            super().save_to_preset(staging, max_shard_size=max_shard_size)

    def compile(self, optimizer="auto", loss="auto", *, sampler="greedy", jit_compile="auto", **kwargs):
        """Keras' `compile` (plus KerasHub's `sampler`), with two changes.
        `loss="auto"` is `TokenCrossentropy`: Keras' sparse categorical
        cross-entropy from the logits, with the same values and gradients,
        that keeps fewer logits-sized buffers (see `token_loss`; on JAX and
        TensorFlow, LoRA training computes it from the hidden states, see
        `loss_from_hidden_states`). `weighted_metrics="auto"` is
        `TokenAccuracy`: KerasHub's sparse categorical accuracy, exact with
        16-bit logits. And
        `jit_compile="auto"` compiles on every backend, for `fit()` and
        `generate()` alike. Keras resolves "auto" to no compilation on
        PyTorch and on TensorFlow without a GPU, where Gemma runs several
        times slower. The exception: `fit()` of a bfloat16/float16 model on
        TensorFlow without a GPU runs as a TensorFlow graph (oneDNN's
        bfloat16 kernels, 1.6x faster than XLA's there); `generate()` still
        compiles with XLA. PyTorch's `torch.compile` takes time per new model
        and shape. `KERAS_GEMMA_TORCH_COMPILE` in the environment chooses:
        `1` (default) traces and compiles one decoder block of each kind
        and reuses it for the other layers (gemma3_270m's first call on a
        2-core CPU with Inductor's on-disk cache cold: 25-28 s); `step`
        compiles the whole decode step as one graph with Inductor's C++
        wrapper (0-5% faster decoding there, first call 4-5x later); `0`
        keeps PyTorch eager. On TensorFlow, `KERAS_GEMMA_TF_XLA=0` makes
        "auto" run `fit()` and `generate()` as TensorFlow graphs without XLA
        (no XLA compile: a tiny model's first `generate()` 3 s instead of
        7.5 s on a 2-core CPU; slower decoding). `jit_compile=False` or
        `run_eagerly=True` turn compilation off.
        """
        tensorflow_graphs = keras.config.backend() == "tensorflow" and not _tensorflow_xla()
        self._xla_generate = jit_compile is True or (jit_compile == "auto" and not tensorflow_graphs)
        if jit_compile == "auto":
            eager_torch = keras.config.backend() == "torch" and _torch_compile_mode() == "0"
            jit_compile = not (eager_torch or tensorflow_graphs)
            if _fits_faster_as_tensorflow_graph(self.backbone):
                jit_compile = False
        # Checked before anything changes: a rejected sampler is not kept.
        sampler = resolve_sampler(sampler)
        check_sampler(sampler, self.backbone.vocabulary_size)
        if keras.config.backend() == "torch" and jit_compile:
            shorten_keras_tracing()  # For `fit()`'s and `generate()`'s torch.compile.
        if loss == "auto":
            loss = TokenCrossentropy()
        weighted_metrics = kwargs.pop("weighted_metrics", "auto")
        if weighted_metrics == "auto":
            weighted_metrics = [TokenAccuracy()]
        # Whether the metrics can do without the logits (see `compute_loss`).
        self._compiled_for_hidden_state_loss = (
            not kwargs.get("metrics")
            and kwargs.get("loss_weights") is None
            and all(type(metric) in ACCURACIES for metric in weighted_metrics or ())
        )
        super().compile(
            optimizer, loss, sampler=sampler, jit_compile=jit_compile,
            weighted_metrics=weighted_metrics, **kwargs,
        )
        # Saved with the compile arguments, so load_model restores it.
        self._compile_config.config["sampler"] = sampler
        self._compiled_variables = variable_refs(self)

    @property
    def loss_from_hidden_states(self):
        """Whether training computes the loss from the final hidden states
        (`token_loss.hidden_state_loss`: the logits in chunks, none kept
        for the backward pass) rather than from all the logits: on JAX and
        TensorFlow, with a frozen embedding table (LoRA), the default loss or
        Keras' `SparseCategoricalCrossentropy(from_logits=True)`, and no
        metrics but sparse categorical accuracies (weighted, as KerasHub's),
        not in float16 (its gradients would be rounded before the loss
        scaling). The values are the same as from the logits (but see
        `token_loss.TokenAccuracy`); inside the train step the model's
        call then returns the hidden states. gemma3_270m LoRA training
        peaks (batch 4 x 256): see the README."""
        return (
            keras.config.backend() in ("jax", "tensorflow")
            and bool(logits_per_chunk_of(self.loss))
            and getattr(self, "_compiled_for_hidden_state_loss", False)
            and self.backbone.dtype_policy.compute_dtype != "float16"
            and not self.backbone.token_embedding.trainable_weights
            # `compute_metrics` tells the two apart by their last axis.
            and self.backbone.hidden_dim != self.backbone.vocabulary_size
        )

    def train_step(self, *args, **kwargs):
        # Only Keras' own step pairs `call` and `compute_loss` on hidden
        # states: `model(x, training=True)` elsewhere gives logits.
        if keras.config.backend() == "torch":  # (Never on PyTorch.)
            return super().train_step(*args, **kwargs)
        self._loss_on_hidden_states = self.loss_from_hidden_states
        try:
            return super().train_step(*args, **kwargs)
        finally:
            self._loss_on_hidden_states = False

    def call(self, inputs, training=None, mask=None, **kwargs):
        if training and getattr(self, "_loss_on_hidden_states", False):
            return self.backbone(inputs, training=training)
        return super().call(inputs, training=training, mask=mask, **kwargs)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        on_hidden_states = (
            training
            and getattr(self, "_loss_on_hidden_states", False)
            and y_pred.shape[-1] == self.backbone.hidden_dim
        )
        if not on_hidden_states:
            return super().compute_loss(x, y, y_pred, sample_weight, training=training)
        loss, predictions = hidden_state_loss(
            self.loss, y, y_pred, self.backbone.token_logits, self.backbone.vocabulary_size, sample_weight
        )
        if self._compile_metrics is not None and not self._compile_metrics.built:
            # TensorFlow builds them at their first update, after this one.
            self._compile_metrics.build(y, y_pred)
        compiled_metrics = getattr(self._compile_metrics, "metrics", ())
        for accuracy in compiled_metrics:  # All `ACCURACIES` (see `compile`).
            count_predictions(accuracy, y, predictions, sample_weight)
        for extra in self.losses:
            loss = loss + self._aggregate_additional_loss(extra)
        return loss

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        if self.loss_from_hidden_states and y_pred.shape[-1] == self.backbone.hidden_dim:
            return self.get_metrics_result()  # Updated by `compute_loss`.
        return super().compute_metrics(x, y, y_pred, sample_weight)

    def compile_from_config(self, config):
        """`keras.models.load_model` compiles the model as it was saved: the
        optimizer, loss and metrics (Keras skips a custom `compile()`, and
        the default optimizer then received the saved one's variables).
        `jit_compile` is resolved again for the loading machine."""
        config = keras.saving.deserialize_keras_object(config)
        config.pop("jit_compile", None)
        self.compile(**config)
        if self.built:
            self.optimizer.build(self.trainable_variables)  # For the saved variables.

    def quantize(self, mode=None, config=None, **kwargs):
        """Quantize the weights (Keras' `Model.quantize`).

        `"int8"` is weight-only here: kernels and embeddings are stored as
        int8 with per-channel scales and activations stay in the compute
        dtype, so decoding reads a quarter of the float32 bytes with little
        quality loss. Pass `config=keras.quantizers.Int8QuantizationConfig()`
        for Keras' default, which also quantizes activations.
        """
        # The backbone only: the preprocessor's tokenizer is a layer too.
        self.backbone.quantize(mode, config=config, **kwargs)
        self.generate_function = None  # Recompile for the new weights.

    def make_generate_function(self):
        """The generation function, compiled once per input shape and reused.

        JAX (`jit`) and TensorFlow (XLA) compile the whole loop with
        KerasHub's machinery. PyTorch cannot compile a loop, so one decode
        step (model, sampler, token write) is compiled with `torch.compile`
        and a short Python loop drives it. See `compile()` for turning
        compilation off.
        """
        if self.generate_function is None:
            self._torch_decode_body = None
            torch_compile = self.jit_compile and not self.run_eagerly
            if keras.config.backend() == "torch" and torch_compile:
                # Prefill stays eager: one big pass.
                self._torch_decode_body = _TorchDecodeStep(self)
            if keras.config.backend() == "tensorflow" and not self.run_eagerly:
                import tensorflow as tf

                # XLA even where `fit()` runs as a graph (see `compile`).
                # No AutoGraph: the loops are explicit `ops.while_loop`s (the
                # same code runs under `jax.jit`), and converting every layer
                # call cost ~15% of the 270M model's first call.
                xla = getattr(self, "_xla_generate", True)
                compiled = tf.function(self.generate_step, jit_compile=xla, autograph=False)
                # Each prompt bucket, sampler and model traces its own: by
                # design, not the user's mistake that TF's warning about
                # frequent retracing suggests (after `quantize()`, say).
                compiled._omit_frequent_tracing_warning = True
            elif keras.config.backend() == "jax" and not self.run_eagerly:
                # KerasHub's would jit even with `jit_compile=False`.
                compiled = _jax_generate_function(self) if self.jit_compile else self.generate_step
            else:
                compiled = super().make_generate_function()

            def generate_function(inputs, stop_token_ids=None):
                if self.preprocessor is None:  # Each batch, tf.data's too.
                    self._check_token_inputs(inputs)
                return compiled(_with_prefill_bucket(inputs), stop_token_ids)

            generate_function.compiled = compiled  # For tests: tracing counts.
            self.generate_function = generate_function
        return self.generate_function

    def generate(self, inputs, max_length=None, stop_token_ids="auto", strip_prompt=False):
        """Generate text (or token ids without a preprocessor) from a
        prompt, a list of prompts or, as KerasHub's Gemma 3, `{"prompts": ...}`.

        `stop_token_ids="auto"` stops on the preprocessor's `stop_tokens`
        (`<eos>`, plus `<end_of_turn>` for instruction-tuned presets); `None`
        generates up to `max_length`.
        """
        sampler_key = checked_sampler(self)
        if isinstance(inputs, dict) and self.preprocessor is not None:
            inputs = _prompts_of(inputs)
        if isinstance(inputs, (list, tuple)) and not inputs:
            raise ValueError("generate() got an empty list of prompts; pass at least one.")
        if self.preprocessor is not None:
            inputs = _checked_prompts(inputs)
        _check_batched(inputs)
        if isinstance(inputs, dict):  # Token ids given as Python lists.
            inputs = {
                key: np.asarray(value) if key in TOKEN_INPUTS and isinstance(value, (list, tuple)) else value
                for key, value in inputs.items()
            }
        if max_length is not None:
            max_length = positive_token_count(max_length, "max_length")
            self._check_room_for(inputs, max_length)
            if self.preprocessor is None and isinstance(inputs, dict):
                inputs = _padded_to(inputs, max_length)
        if isinstance(stop_token_ids, str) and stop_token_ids == "auto":
            if self.preprocessor is not None:  # (Without one KerasHub explains.)
                # No stop tokens: run to max_length (KerasHub's samplers take
                # None for that; an empty tuple crashed them).
                stop_token_ids = tuple(self.preprocessor.stop_token_ids) or None
        else:
            stop_token_ids = token_ids_or_none(stop_token_ids, self.backbone.vocabulary_size)
        # A compiled TensorFlow function keeps the variables it was traced
        # with: after enable_lora / merge_lora / load_lora_weights it would
        # ignore new adapters or apply merged ones twice.
        traced = getattr(self, "_generate_variables", None)
        if traced is not None and not holds_variables(self, traced):
            self.generate_function = None
        self._generate_variables = variable_refs(self)
        if sampler_key != getattr(self, "_generate_sampler_key", None):
            self.generate_function = None
        self._generate_sampler_key = sampler_key
        # Read here, not while tracing (a TensorFlow trace cannot).
        sampled = sampled_vocabulary_size(self)
        if sampled != getattr(self, "_sampled_vocabulary_size", None):
            self.generate_function = None
        self._sampled_vocabulary_size = sampled
        return super().generate(
            inputs, max_length=max_length, stop_token_ids=stop_token_ids,
            strip_prompt=strip_prompt,
        )

    def score(self, token_ids, padding_mask=None, scoring_mode="logits", layer_intercept_fn=None, target_ids=None):
        """Per-token scores of `token_ids` `[batch, seq]` (KerasHub's
        `GemmaCausalLM.score`): `scoring_mode="logits"` gives the logits
        `[batch, seq, vocabulary_size]` (`call`'s), `"loss"` the
        cross-entropy of each position's logits against `target_ids`
        `[batch, seq]`, in float32, `[batch, seq]`. Next-token targets are
        the token ids shifted left, `ops.roll(token_ids, -1, axis=1)`
        (their last column scores nothing real). `padding_mask` defaults
        to all ones.

        `layer_intercept_fn(x, i)`, for interpretability, sees the
        activations and returns what goes on (same shape): `i=-1` the token
        embeddings before Gemma's `sqrt(hidden_dim)` scaling, `i=0, 1, ...`
        the output of each decoder block. Unlike KerasHub's, the value
        returned at `-1` is used, and Gemma 2's final soft-cap is applied,
        so that without an intercept the logits equal `call`'s.
        """
        if scoring_mode not in ("logits", "loss"):
            raise ValueError(f'scoring_mode must be "logits" or "loss", got {scoring_mode!r}.')
        if scoring_mode == "loss" and target_ids is None:
            raise ValueError(
                'scoring_mode="loss" needs target_ids [batch, seq], e.g. the token ids '
                "shifted left: keras.ops.roll(token_ids, -1, axis=1)."
            )
        token_ids = ops.convert_to_tensor(token_ids, "int32")
        shape = tuple(ops.shape(token_ids))
        if len(shape) != 2:
            raise ValueError(f"token_ids must be [batch, seq] token ids, got shape {shape}.")
        self._check_in_vocabulary(token_ids, "token_ids")
        if padding_mask is None:
            padding_mask = ops.ones(shape, "int32")
        padding_mask = _same_shape(padding_mask, shape, "padding_mask", "int32")
        intercept = layer_intercept_fn or (lambda x, i: x)

        def intercepted(x, i):
            out = intercept(x, i)
            if tuple(ops.shape(out)) != tuple(ops.shape(x)):
                raise ValueError(
                    f"layer_intercept_fn returned shape {tuple(ops.shape(out))} at layer {i}; "
                    f"it must return the activations' shape {tuple(ops.shape(x))}."
                )
            return out

        backbone = self.backbone
        x = intercepted(backbone.token_embedding(token_ids), -1)
        x = backbone.embedding_scale(x)
        for i, block in enumerate(backbone.transformer_layers):
            x = intercepted(block(x, padding_mask=padding_mask, training=False), i)
        logits = backbone.token_logits(backbone.layer_norm(x))
        if scoring_mode == "logits":
            return logits
        target_ids = _same_shape(target_ids, shape, "target_ids", "int32")
        self._check_in_vocabulary(target_ids, "target_ids")
        return keras.losses.sparse_categorical_crossentropy(
            target_ids, ops.cast(logits, "float32"), from_logits=True
        )

    def _check_room_for(self, inputs, max_length):
        """Refuse a `max_length` whose KV cache alone exceeds this machine's
        memory: `max_length=10**9` grew the process to 21 GB before the
        kernel killed it, with no error. (A GPU's memory may be smaller
        still; this catches only what cannot fit anywhere here.)"""
        if not hasattr(os, "sysconf"):  # Windows: its memory size is not at hand.
            return
        rows = inputs.get("token_ids") if isinstance(inputs, dict) else inputs
        batch_size = 1 if isinstance(rows, str) or not np.ndim(rows) else len(rows)
        needed = self.backbone.cache_bytes(batch_size, max_length)
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if needed > memory:
            raise ValueError(
                f"max_length={max_length} needs a KV cache of {needed / 2**30:.1f} GiB for "
                f"{batch_size} prompt(s), more than this machine's {memory / 2**30:.1f} GiB "
                "of memory; pass a smaller max_length."
            )

    def _check_token_inputs(self, inputs):
        """generate()'s token ids: a bare KeyError or IndexError deep in the
        loop without these checks, and an id outside the table gave NaN
        (padding too: it spread into the row's prompt) on JAX."""
        if "padding_mask" not in inputs:
            raise ValueError(
                "generate() of token ids needs a padding_mask beside token_ids: "
                "ones for each row's prompt, then zeros where to generate."
            )
        for key in ("token_ids", "padding_mask"):
            if len(ops.shape(inputs[key])) != 2:
                raise ValueError(
                    f"generate() takes {key} of shape [batch, length]; got shape "
                    f"{tuple(ops.shape(inputs[key]))}. Add a batch axis for one row."
                )
        shapes = [tuple(ops.shape(inputs[key])) for key in ("token_ids", "padding_mask")]
        if shapes[0] != shapes[1]:
            raise ValueError(
                f"generate() got token_ids of shape {shapes[0]} and a padding_mask "
                f"of shape {shapes[1]}; they must have the same shape."
            )
        dtype = keras.backend.standardize_dtype(inputs["token_ids"].dtype)
        if "int" not in dtype:
            raise ValueError(f"generate() takes token_ids as integers; got {dtype} values.")
        _check_right_padded(inputs["padding_mask"])
        self._check_in_vocabulary(inputs["token_ids"], "token_ids (padding too; pad with 0)")

    def _check_in_vocabulary(self, ids, name):
        """An id outside the table gave NaN logits on JAX and an IndexError
        on PyTorch, and a target outside it a loss of 0 on JAX and PyTorch
        (PyTorch ignores -100) and an error on TensorFlow. Traced values
        (`jax.jit`, `tf.function`, `torch.compile`) have none to check."""
        if _is_traced(ids):
            return
        ids = ops.convert_to_numpy(ids)
        vocabulary_size = self.backbone.vocabulary_size
        outside = ids[(ids < 0) | (ids >= vocabulary_size)]
        if outside.size:
            raise ValueError(
                f"{name} must be token ids in [0, {vocabulary_size}), got {int(outside[0])}. "
                "To leave positions out, give them any valid id and mask their scores "
                "(e.g. with padding_mask)."
            )

    def make_test_function(self, force=False):
        # Traced with the variables of its first call: rebuilt after
        # enable_lora / load_lora_weights / merge_lora (TensorFlow's ignored
        # new adapters or applied merged ones twice).
        force = force or not holds_variables(self, getattr(self, "_test_variables", ()))
        self._test_variables = variable_refs(self)
        return super().make_test_function(force=force)

    def make_predict_function(self, force=False):
        force = force or not holds_variables(self, getattr(self, "_predict_variables", ()))
        self._predict_variables = variable_refs(self)
        return super().make_predict_function(force=force)

    def fit(
        self, x=None, y=None, batch_size=None, sample_weight=None, validation_data=None,
        validation_split=None, shuffle=True, **kwargs,
    ):
        """Keras' `fit`. In-memory data (lists of strings, instruction
        dicts, arrays) is reshuffled every epoch, as Keras shuffles arrays:
        KerasHub's pipeline sliced it in order, and Keras then warned that
        `shuffle=True` was ignored. Datasets are taken as they are."""
        if self.preprocessor is not None and isinstance(x, dict) and not set(x) & set(TOKEN_INPUTS):
            # Before KerasHub slices the columns into a tf.data.Dataset,
            # whose errors (mismatched lengths, misnamed keys) name no column.
            instruction_columns(x)
        if self.preprocessor is not None and isinstance(x, (list, tuple)):
            if not x:
                raise ValueError("fit() got no examples: `x` is an empty list.")
            check_strings(x, "fit()'s texts")
        _check_batched(x)
        self._check_no_targets(x, y, sample_weight)
        if validation_data is not None and not hasattr(validation_data, "element_spec"):
            self._check_no_targets(*keras.utils.unpack_x_y_sample_weight(validation_data))
        # Without TensorFlow, KerasHub's pipeline (Grain, or a clear error).
        if shuffle is True and HAS_TENSORFLOW and _in_memory(x):
            x = _strings_as_arrays(x)  # Keras' splitter takes arrays, not lists.
            if validation_split and validation_data is None:  # Split before shuffling, as Keras.
                (x, y, sample_weight), validation_data = _train_validation_split(
                    (x, y, sample_weight), validation_split=validation_split
                )
            x = _shuffled_dataset(x, y, sample_weight, batch_size)
            y = sample_weight = batch_size = validation_split = None
            shuffle = False  # Done; Keras would warn that a dataset is not shuffled.
        with _variables_restored_on_error(self):
            return super().fit(
                x, y, batch_size=batch_size, sample_weight=sample_weight,
                validation_data=validation_data, validation_split=validation_split,
                shuffle=shuffle, **kwargs,
            )

    def evaluate(self, x=None, y=None, batch_size=None, sample_weight=None, **kwargs):
        _check_batched(x)
        self._check_no_targets(x, y, sample_weight)
        with _variables_restored_on_error(self):
            return super().evaluate(x, y, batch_size=batch_size, sample_weight=sample_weight, **kwargs)

    def _check_no_targets(self, x, y, sample_weight):
        """The preprocessor makes the labels and token weights itself;
        KerasHub silently drops a `y` or `sample_weight` given with raw
        inputs, so training ignored the weights the user asked for."""
        if self.preprocessor is None:
            return
        if isinstance(x, dict) and not set(x) & set(INSTRUCTION_KEYS):
            return  # Token ids: the preprocessor says to remove it.
        if y is not None:
            raise ValueError(
                "`y` is not used with a preprocessor: each token's label is the "
                "next token of `x`. Pass the text as `x` alone, or prompt/response "
                "pairs as `x={'prompts': [...], 'responses': [...]}` for a loss on "
                "the responses only."
            )
        if sample_weight is not None:
            raise ValueError(
                "`sample_weight` is not used with a preprocessor: it weights the "
                "tokens itself (padding and, for instruction data, prompts get 0). "
                "To weight examples, preprocess them (`x, y, token_weights = "
                "gemma_lm.preprocessor(texts)`), scale `token_weights` and fit a "
                "GemmaCausalLM with `preprocessor=None` on `(x, y, token_weights)`."
            )

    def predict(self, *args, **kwargs):
        with _variables_restored_on_error(self):
            return super().predict(*args, **kwargs)

    def make_train_function(self, force=False):
        """On PyTorch, `torch.compile` the whole train step as one graph:
        forward, backward and update. Keras compiles a wrapper around the
        step, and its `loss.backward()` is a graph break, so Dynamo traced
        the forward pass three times (once per frame above the break, then
        again to compile up to it) and the update as a second graph: the
        CPU config's first step took 35 s with Inductor's cache warm (48-60
        s cold). Dynamo traces `backward()` itself when asked
        (`trace_autograd_ops`): 12 s, one trace."""
        compiled_with = getattr(self, "_compiled_variables", None)
        if compiled_with is not None and not holds_variables(self, compiled_with):
            raise ValueError(
                "The model's weights changed after compile() (enable_lora, "
                "load_lora_weights, merge_lora, quantize, or layers frozen or "
                "unfrozen): the optimizer and the compiled train step still "
                "hold the old ones. Call compile() again before training."
            )
        if self.train_function is not None and not force:
            return self.train_function
        super().make_train_function(force=force)  # Keras' checks, its other backends.
        if keras.config.backend() == "torch" and self._should_torch_compile():
            import torch

            compiled_step = torch.compile(self.train_step, **recompile_budget())
            # Keras' optimizers with weight decay fill a cache at their first
            # update; filled inside the compiled step, it fails Dynamo's
            # guards at the second, which traced and compiled the whole step
            # again (gemma3_270m: 40-80 s). Filled here, before tracing.
            for optimizer in (self.optimizer, getattr(self.optimizer, "inner_optimizer", None)):
                if hasattr(optimizer, "_use_weight_decay"):
                    for variable in self.trainable_weights:
                        optimizer._use_weight_decay(variable)

            def one_step_on_data(data):
                with torch._dynamo.config.patch(trace_autograd_ops=True):
                    logs = compiled_step(data[0])
                # Keras' step clears the gradients before the backward pass,
                # so the compiled step would find them unset at the first
                # call and set at the second: Dynamo compiled the step twice
                # (10+ s each on a CPU). Cleared after the update, they are
                # unset at every call, and no gradient memory is held between
                # steps.
                for variable in self.trainable_weights:
                    variable.value.grad = None
                return logs

            self.train_function = one_step_on_data
        return self.train_function

    def export_to_transformers(self, path):
        """Write a Hugging Face transformers directory (safetensors,
        config.json, tokenizer.model) that loads with equal logits."""
        from keras_gemma.checkpoints.hf import export_to_transformers

        export_to_transformers(self, path)

    def call_with_cache(
        self, token_ids, cache, cache_update_index, cache_write_end=None
    ):
        """One cached forward pass; returns `(logits, hidden_states, cache)`."""
        hidden_states, cache = self.backbone.call_with_cache(
            token_ids, cache, cache_update_index, cache_write_end
        )
        return self.backbone.token_logits(hidden_states), hidden_states, cache

    def generate_step(self, inputs, stop_token_ids=None):
        """Generate for one batch of right-padded `{"token_ids", "padding_mask"}`.

        The prompt is prefilled into the cache in one pass; then, starting at
        the shortest prompt's end, each step feeds the previous token and the
        sampler fills only the positions that were padding.
        """
        token_ids, padding_mask = inputs["token_ids"], inputs["padding_mask"]
        batch_size, max_length = ops.shape(token_ids)
        prompt_lengths = ops.sum(ops.cast(padding_mask, "int32"), axis=-1)
        start = ops.min(prompt_lengths)
        # Prefill in one pass. Decoding restarts at the shortest prompt's end
        # and feeds the later positions again, so only earlier ones are kept.
        # Only the cache and hidden states are needed: no vocabulary logits
        # for the whole padded prompt.
        # Token-by-token samplers only need the cache before `start`, so the
        # prefill covers just a bucket of positions (`_with_prefill_bucket`);
        # contrastive search reads the hidden states of every position.
        token_by_token = samples_token_by_token(self.sampler)
        prefill_ids = inputs.get("prefill_token_ids", token_ids) if token_by_token else token_ids
        compiled_body = getattr(self, "_torch_decode_body", None)
        torch_loop = compiled_body is not None and token_by_token
        # PyTorch compiles its decode step per shape (minutes for a big
        # model): lengths up to the same bucket share one step.
        buffer, buffer_mask = (
            _padded_to_bucket(token_ids, padding_mask) if torch_loop else (token_ids, padding_mask)
        )
        cache = self.backbone.empty_cache(batch_size, ops.shape(buffer)[1])
        hidden_states, cache = self.backbone.call_with_cache(
            prefill_ids, cache, 0, cache_write_end=start
        )

        if torch_loop:
            token_ids = _python_decode_loop(
                compiled_body, buffer, cache, start, buffer_mask, stop_token_ids, end=max_length
            )[:, :max_length]
        else:

            def next_token_logits(prompt, cache, index):
                # Feed the token before `index`; its logits predict `index`.
                # Beam and contrastive search feed `batch * beams` rows.
                previous = ops.slice(prompt, [0, index - 1], [ops.shape(prompt)[0], 1])
                return self._one_token_step(previous, cache, index - 1)

            token_ids = self.sampler(
                next=next_token_logits,
                prompt=token_ids,
                cache=cache,
                index=start,
                mask=padding_mask,
                stop_token_ids=stop_token_ids,
                hidden_states=hidden_states,
                model=self,
            )
        return {
            "token_ids": token_ids,
            "padding_mask": _generated_mask(token_ids, padding_mask, stop_token_ids),
        }

    def _one_token_step(self, token_ids, cache, index):
        """Sampling logits and hidden states `[batch, ...]` for the `[batch,
        1]` tokens at position `index`, and the updated cache."""
        hidden_states, cache = self.backbone.call_with_cache(token_ids, cache, index)
        hidden_states = ops.squeeze(hidden_states, axis=1)
        logits = self.sampling_logits(hidden_states, getattr(self, "_sampled_vocabulary_size", None))
        return logits, hidden_states, cache

    def sampling_logits(self, hidden_states, sampled_vocabulary_size=None):
        """The logits to sample from: the vocabulary's, with the ids from
        `sampled_vocabulary_size` on (embedding rows the tokenizer has no
        piece for, see `sampled_vocabulary_size()`) never chosen."""
        logits = self.backbone.token_logits(hidden_states)
        if sampled_vocabulary_size is None:
            return logits
        ids = ops.arange(self.backbone.vocabulary_size)
        return ops.where(ids < sampled_vocabulary_size, logits, ops.cast(-np.inf, logits.dtype))

    def _decode_body(self, token_ids, cache, index, mask, stop_token_ids):
        """One decode step, as the sampler's loop body does it: feed the
        token before `index`, sample position `index` (prompt positions keep
        their token). Returns `(token_ids, cache, done)` where `done` is true
        once every row has produced a stop token."""
        logits, cache = self._decode_logits(token_ids, cache, index)
        token_ids, done = self._write_sampled_token(token_ids, logits, index, mask, stop_token_ids)
        return token_ids, cache, done

    def _decode_logits(self, token_ids, cache, index):
        """The model's part of a decode step: `(logits for position index,
        cache)`, fed the token before `index`."""
        logits, _, cache = self._one_token_step(_column(token_ids, index - 1), cache, index - 1)
        return logits, cache

    def _write_sampled_token(self, token_ids, logits, index, mask, stop_token_ids):
        """The sampler's part: `(token_ids with position index sampled
        unless it is prompt, whether every row has stopped)`."""
        next_token = self.sampler.get_next_token(self.sampler.compute_probabilities(logits))
        current, keep = _column(token_ids, index), _column(mask, index)
        next_token = ops.where(keep, current, ops.cast(next_token, token_ids.dtype)[:, None])
        token_ids = ops.slice_update(token_ids, [0, index], next_token)
        if stop_token_ids is None:
            return token_ids, ops.convert_to_tensor(False)
        stopped = ops.any(any_equal(token_ids, stop_token_ids, ops.logical_not(mask)), axis=-1)
        return token_ids, ops.all(stopped)


def _column(x, i):
    """Column `i` (a tensor) of `x`, gathered: slicing at a tensor index
    breaks the graph."""
    return ops.take(x, ops.reshape(i, (1,)), axis=1)


class _TorchDecodeStep:
    """The PyTorch decode step, compiled (`compiled`, a `_TorchCompiledStep`).
    Random sampling breaks Dynamo's graph (`torch.multinomial`), and a
    broken graph compiled every layer apart and piece by piece: a top-p
    sampler's first `generate()` of gemma3_270m took 3-6 minutes on a 2-core
    CPU instead of greedy's 30 s. So only greedy steps compile whole; with
    other samplers the model's part compiles and the sampler runs eagerly."""

    def __init__(self, gemma_lm):
        self.gemma_lm = gemma_lm
        self.whole = isinstance(gemma_lm.sampler, KerasHubGreedySampler)
        step = gemma_lm._decode_body if self.whole else gemma_lm._decode_logits
        self.compiled = _TorchCompiledStep(step, gemma_lm.backbone)

    def __call__(self, token_ids, cache, index, mask, stop_token_ids, skip_guards=False):
        if self.whole:
            return self.compiled(token_ids, cache, index, mask, stop_token_ids, skip_guards=skip_guards)
        logits, cache = self.compiled(token_ids, cache, index, skip_guards=skip_guards)
        token_ids, done = self.gemma_lm._write_sampled_token(token_ids, logits, index, mask, stop_token_ids)
        return token_ids, cache, done


@contextlib.contextmanager
def _variables_restored_on_error(gemma_lm):
    """Keras' JAX trainer detaches every variable's value while `fit()`,
    `evaluate()` or `predict()` runs and reattaches the state of the last
    finished step. An error or interrupt before a step finished (data of the
    wrong shape, a stopped first compile) left them detached: every later
    call failed with "'NoneType' object is not callable" and the model had
    to be reloaded. Reattach the values the call started with. Only
    references are held: buffers donated to a finished step are freed."""
    if keras.config.backend() != "jax":
        yield
        return
    optimizer_variables = gemma_lm.optimizer.variables if gemma_lm.optimizer else []
    variables = gemma_lm.variables + gemma_lm.metrics_variables + optimizer_variables
    started_with = [(variable, variable._value) for variable in variables]
    try:
        yield
    except BaseException:
        for variable, value in started_with:
            if variable._value is None and value is not None and not value.is_deleted():
                variable._value = value
        raise


def _in_memory(x):
    """Whether `x` is data held in memory (lists, arrays, tensors, or a dict
    of them) rather than a dataset or generator."""
    if isinstance(x, dict):
        return bool(x) and all(_in_memory(value) for value in x.values())
    if isinstance(x, (list, tuple, np.ndarray)):
        return True
    return hasattr(x, "__array__") and hasattr(x, "shape") and not hasattr(x, "element_spec")


def _strings_as_arrays(x):
    """A list of strings, or a dict of them (instruction data), as NumPy
    arrays; anything else as it is."""
    if isinstance(x, dict):
        return {key: _strings_as_arrays(value) for key, value in x.items()}
    if isinstance(x, (list, tuple)) and x and all(isinstance(item, str) for item in x):
        return np.asarray(x)
    return x


def _shuffled_dataset(x, y, sample_weight, batch_size):
    """In-memory examples as a `tf.data.Dataset` that shuffles them anew
    each epoch, in batches of `batch_size` (default 32, as KerasHub)."""
    import tensorflow as tf

    def slicable(value):  # Other backends' tensors as NumPy.
        if isinstance(value, (tf.Tensor, tf.RaggedTensor)) or not hasattr(value, "__array__"):
            return value
        return ops.convert_to_numpy(value)

    inputs = keras.tree.map_structure(slicable, keras.utils.pack_x_y_sample_weight(x, y, sample_weight))
    dataset = tf.data.Dataset.from_tensor_slices(inputs)
    return dataset.shuffle(int(dataset.cardinality()), reshuffle_each_iteration=True).batch(batch_size or 32)


def _prompts_of(inputs):
    """The prompts of KerasHub Gemma 3's `generate({"prompts": [...]})`."""
    if set(inputs) != {"prompts"}:
        raise ValueError(
            f"generate() takes {{'prompts': ...}} alone, got keys {sorted(inputs)}; "
            "responses and images are not supported. Pass the prompts (a string "
            "or a list of strings); to continue a started answer, end the prompt "
            "with it. Token ids (token_ids, padding_mask) need a model without a "
            "preprocessor (`gemma_lm.preprocessor = None`)."
        )
    return inputs["prompts"]


def _checked_prompts(inputs):
    """Prompts as the preprocessor takes them: a bytes prompt as text
    (KerasHub took it for a batch and failed with an IndexError), and a
    clear error for what is not text (KerasHub's tokenizer error quoted its
    arguments). Arrays, tensors and datasets pass as they are."""
    if isinstance(inputs, bytes):
        return inputs.decode("utf-8")
    if inputs is None or isinstance(inputs, numbers.Number):
        raise ValueError(
            "generate() takes a prompt (a string), a list of prompts or "
            f"{{'prompts': [...]}}; got {type(inputs).__name__} {inputs!r}."
        )
    check_strings(inputs, "generate()'s prompts")
    return inputs


def _padded_to(inputs, length):
    """Token-id inputs padded to `length` columns: without a preprocessor
    generation fills the prompts' padding, so their width is the length
    (KerasHub ignores `max_length` there)."""
    token_ids = ops.convert_to_numpy(inputs["token_ids"])
    width = token_ids.shape[-1]
    if length < width:
        raise ValueError(
            f"max_length={length} is shorter than the token_ids' {width} "
            "columns, which generation fills; pass a max_length of at "
            f"least {width}, or none (the width is the length)."
        )
    padding = [(0, 0)] * (token_ids.ndim - 1) + [(0, length - width)]
    padded = dict(inputs, token_ids=np.pad(token_ids, padding))
    if "padding_mask" in inputs:
        padded["padding_mask"] = np.pad(ops.convert_to_numpy(inputs["padding_mask"]), padding)
    return padded


def _check_batched(x):
    """A `tf.data.Dataset` of single strings (not `.batch()`ed) failed deep
    in Keras ("Invalid input shape", "as_list() is not defined")."""
    spec = getattr(x, "element_spec", None)
    if spec is None or not hasattr(x, "batch"):
        return
    if isinstance(spec, tuple):  # (x, y, sample_weight): the inputs.
        spec = spec[0]
    if any(s.shape.rank == 0 and s.dtype.name == "string" for s in keras.tree.flatten(spec)):
        raise ValueError(
            "The dataset yields single examples (string scalars); batch it "
            "first, e.g. `dataset.batch(4)`."
        )


def sampled_vocabulary_size(gemma_lm):
    """How many ids generation may produce, where fewer than the
    embedding's rows: the tokenizer's pieces. Hugging Face's Gemma 3
    4B/12B/27B files hold 262208 rows (64 for image tokens) for 262144
    pieces; an id past the pieces cannot be turned into text. Else None."""
    tokenizer = getattr(gemma_lm.preprocessor, "tokenizer", None)
    if tokenizer is None:
        return None
    pieces = tokenizer.vocabulary_size()
    return pieces if pieces < gemma_lm.backbone.vocabulary_size else None


def _is_traced(x):
    """Whether `x` stands for values not computed yet (inside `jax.jit`,
    `tf.function` or `torch.compile`)."""
    backend = keras.config.backend()
    if backend == "jax":
        import jax

        return isinstance(x, jax.core.Tracer)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.is_symbolic_tensor(x)
    return dynamo_is_tracing()


def _check_right_padded(padding_mask):
    """generate() continues each row after its last prompt token: the
    prompt must start the row, and some row must have room left."""
    mask = np.atleast_2d(ops.convert_to_numpy(padding_mask)).astype(bool)
    lengths = mask.sum(axis=-1)
    right_padded = np.arange(mask.shape[-1]) < lengths[..., None]
    bad = np.flatnonzero(np.any(mask != right_padded, axis=-1) | (lengths == 0))
    if bad.size:
        raise ValueError(
            f"generate() takes right-padded prompts: each padding_mask row is "
            f"ones (at least one) for the prompt, then zeros; row {bad[0]} is "
            f"{mask[bad[0]].astype(int).tolist()}. Move each prompt's tokens to "
            "the start of its row (transformers-style left padding is not "
            "supported)."
        )
    if mask.all():  # KerasHub returns the prompts unchanged: nothing says why.
        raise ValueError(
            "generate() has no room for new tokens: every row's padding_mask is all "
            "ones. Pad token_ids with zeros where to generate (padding_mask 0 there), "
            "or pass a max_length longer than the rows."
        )


def variable_refs(gemma_lm):
    """Weak references to the backbone's variables (ids of deleted variables
    can be reused) and whether each is trainable, for `holds_variables`."""
    return tuple((weakref.ref(v), v.trainable) for v in gemma_lm.backbone.weights)


def holds_variables(gemma_lm, refs):
    """Whether the backbone still has exactly the variables of `refs`, each
    as trainable as it was: not after enable_lora / merge_lora /
    load_lora_weights, which a compiled function traced before would miss,
    nor after layers were frozen or unfrozen (JAX's function pairs values
    with variables by their place among the trainable and non-trainable
    ones, and same-shaped layers swapped places silently)."""
    variables = gemma_lm.backbone.weights
    return len(refs) == len(variables) and all(
        ref() is v and trainable == v.trainable for (ref, trainable), v in zip(refs, variables)
    )


def jax_compiler_options():
    """XLA options for JAX's generation functions. On CPU: 512-bit vectors
    in XLA's own loops (the int8 products of `one_row_product_in_place`):
    gemma3_270m int8 decoding 27-30 -> 24-25.5 ms per token on an AVX-512
    CPU; float32 unchanged (its products are library calls). LLVM ignores
    the preference on CPUs without 512-bit vectors."""
    import jax

    return {"xla_cpu_prefer_vector_width": 512} if jax.default_backend() == "cpu" else None


def _jax_generate_function(gemma_lm):
    """`generate_step` under `jax.jit`, as KerasHub compiles it, with
    `jax_compiler_options()`."""
    import itertools

    import jax

    options = jax_compiler_options()

    def generate(inputs, stop_token_ids, state):
        sampler_values, trainable_values, non_trainable_values = state
        mapping = itertools.chain(
            zip(gemma_lm.sampler.variables, sampler_values),
            zip(gemma_lm.trainable_variables, trainable_values),
            zip(gemma_lm.non_trainable_variables, non_trainable_values),
        )
        with keras.StatelessScope(state_mapping=mapping) as scope:
            outputs = gemma_lm.generate_step(inputs, stop_token_ids)
        # The sampler's variables (random seeds) advance; nothing else may.
        new_sampler_values = []
        for variable in gemma_lm.sampler.variables:
            value = scope.get_current_value(variable)
            new_sampler_values.append(variable if value is None else value)
        return outputs, new_sampler_values

    compiled = jax.jit(generate, static_argnames=["stop_token_ids"], compiler_options=options)

    def generate_function(inputs, stop_token_ids=None):
        if isinstance(stop_token_ids, list):
            stop_token_ids = tuple(stop_token_ids)
        state = (
            [v.value for v in gemma_lm.sampler.variables],
            [v.value for v in gemma_lm.trainable_variables],
            [v.value for v in gemma_lm.non_trainable_variables],
        )
        inputs = keras.tree.map_structure(ops.convert_to_tensor, inputs)
        outputs, sampler_values = compiled(inputs, stop_token_ids, state)
        for variable, value in zip(gemma_lm.sampler.variables, sampler_values):
            variable.assign(value)
        return outputs

    generate_function.compiled = compiled
    return generate_function


def _with_prefill_bucket(inputs):
    """Add `prefill_token_ids`: the first `2**k >= shortest prompt` columns
    (at least 16). Prefill then costs the prompt, not `max_length`, and the
    number of compiled shapes stays logarithmic in the prompt length."""
    mask = ops.convert_to_numpy(inputs["padding_mask"])
    bucket = prefill_bucket(int(mask.sum(axis=-1).min()), mask.shape[1])
    return {**inputs, "prefill_token_ids": inputs["token_ids"][:, :bucket]}


def prefill_bucket(prompt_length, limit):
    """`2**k >= prompt_length`, at least 16 and at most `limit`: prefill
    shapes (each compiled once) stay logarithmic in the prompt length."""
    return min(limit, max(16, 1 << max(prompt_length - 1, 0).bit_length()))


def length_bucket(length):
    """256, 512, 1024, then multiples of 1024 (a long context's cache grows
    by less than 1024 slots): the decode buffer and KV cache length for
    `length` tokens, so that nearby lengths share one compiled step."""
    if length <= 1024:
        return max(256, 1 << (length - 1).bit_length())
    return -(-length // 1024) * 1024


def samples_token_by_token(sampler):
    """Whether the sampler is a plain next-token sampler (greedy, top-k,
    top-p, random...) whose loop `_decode_body` reproduces; beam and
    contrastive search keep their own loops."""
    return type(sampler).__call__ is Sampler.__call__


def _padded_to_bucket(token_ids, padding_mask):
    """`token_ids` and `padding_mask` padded to `length_bucket` columns. The
    padding counts as prompt: it is never sampled and never taken for a stop
    token; the decode loop ends before it."""
    batch_size, length = ops.shape(token_ids)
    extra = length_bucket(length) - length
    token_ids = ops.pad(token_ids, [[0, 0], [0, extra]])
    padding = ops.ones((batch_size, extra), "bool")
    return token_ids, ops.concatenate([ops.cast(padding_mask, "bool"), padding], axis=1)


def _python_decode_loop(decode_body, token_ids, cache, start, mask, stop_token_ids, end):
    """Drive the compiled PyTorch decode step from `start` to `end`."""
    import torch

    # Tensors, not NumPy arrays: the compiled step would break on those.
    token_ids, mask = ops.convert_to_tensor(token_ids), ops.cast(mask, "bool")
    if stop_token_ids is not None:
        stop_token_ids = tuple(stop_token_ids)
    index = torch.as_tensor(start, dtype=torch.int32, device=token_ids.device)
    for step in range(int(start), end):
        # The first two steps compile (or pick) the step's graphs; the same
        # objects and shapes come back at every later step.
        warm = step >= int(start) + 2
        token_ids, cache, done = decode_body(
            token_ids, cache, index, mask, stop_token_ids, skip_guards=warm
        )
        if stop_token_ids is not None and bool(done):
            break
        index = index + 1
    return token_ids


class _TorchCompiledStep:
    """A `torch.compile`d decode step, with static shapes: one graph per
    (batch, length bucket), reused across calls (dynamic shapes recompiled at
    every step).

    By default (`KERAS_GEMMA_TORCH_COMPILE=1`) each decoder block is a
    nested compile region: one block of each kind is traced and compiled,
    the others reuse it. Where Dynamo cannot trace a block as a region
    (a graph break inside it, say), the step falls back to one graph of
    every block. That graph, and `step` mode, use Inductor's C++
    wrapper, which launches the kernels without Python in between (about
    1.4x faster decoding on the CPU config) but cannot call regions.

    The step is compiled as one graph when it can be, and then `skip_guards`
    skips Dynamo's guard checks, which cost milliseconds per call on a Keras
    model; a step that cannot be one graph runs eagerly.
    """

    def __init__(self, step, backbone):
        self.step = step
        self.backbone = backbone
        self.one_graph = True
        lay_out_kernels_for_decoding(backbone)
        # An older PyTorch without keyed regions compiles one graph.
        self._compile(blocks_once=_torch_compile_mode() == "1" and block_regions_available())

    def _compile(self, blocks_once):
        import torch

        self.backbone.trace_blocks_once = blocks_once
        if blocks_once:
            mark_blocks_for_one_trace(self.backbone.transformer_layers)
        self.options = _torch_compile_options(cpp_wrapper=not blocks_once)
        self.compiled = torch.compile(
            self.step, dynamic=False, fullgraph=True, options=self.options,
            **recompile_budget(),
        )

    def __call__(self, *args, skip_guards=False):
        import torch

        if not self.options.get("triton.cudagraphs"):
            return self._run(*args, skip_guards=skip_guards)
        # Each replay writes its outputs where the last replay wrote its own,
        # which this step reads: the carried token ids and cache are copied
        # out before the next replay (as gpt-fast does).
        torch.compiler.cudagraph_mark_step_begin()
        outputs = self._run(*args, skip_guards=skip_guards)
        return keras.tree.map_structure(torch.clone, outputs)

    # Whether steps may skip their guards (see `_run`).
    guards_skippable = True

    def _run(self, *args, skip_guards=False):
        import torch

        if not self.one_graph:
            return self.step(*args)
        skip_guards = skip_guards and _TorchCompiledStep.guards_skippable
        try:
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=skip_guards):
                return self.compiled(*args)
        except RuntimeError as error:
            if skip_guards and "skip_guard_eval_unsafe" in str(error):
                # No cached graph fits without its guards (raised on entering
                # the step, before it ran): keep the guards from now on.
                _TorchCompiledStep.guards_skippable = False
                return self._run(*args)
            if not isinstance(error, torch._dynamo.exc.TorchDynamoException):
                raise
            if self.backbone.trace_blocks_once:  # Not as regions: try one graph.
                self._compile(blocks_once=False)
                return self._run(*args)
            # Not one graph either (an int8 model that quantizes its
            # activations): eager. Compiling it in pieces made Dynamo skip
            # the step's code, which every model shares, from then on: later
            # models decoded eagerly, or failed without their guards.
            self.one_graph = False
            return self.step(*args)


def recompile_budget():
    """`torch.compile` arguments with room for many compiled versions.
    Dynamo keeps at most 8 versions of one code object per process, and
    every model's step is the same code: the ninth model (or a model's
    ninth shape: one per batch size and length bucket) to generate failed
    with "recompile limit exceeded" (the decode step is one graph, where
    Dynamo does not fall back to eager). The versions stay shared, so a
    model compiled again (`compile()`) still reuses its step
    (`isolate_recompiles` would trace it again: 1.3 s against 0.02 s on a
    tiny model)."""
    import inspect

    import torch

    if "recompile_limit" not in inspect.signature(torch.compile).parameters:
        return {}  # Older PyTorch: its global limit stays.
    return {"recompile_limit": 64}


def _torch_compile_options(cpp_wrapper):
    """The C++ wrapper where asked (Inductor's C++ wrapper cannot call
    nested compile regions). On a GPU, `KERAS_GEMMA_TORCH_CUDAGRAPHS=1`
    replays each step as one CUDA graph instead (experimental: removes the
    per-kernel launch cost, which bounds a small model's decode step)."""
    if _replays_cuda_graphs():
        return {"triton.cudagraphs": True}
    return {"cpp_wrapper": True} if cpp_wrapper else {}


def _replays_cuda_graphs():
    """Whether PyTorch's decode step is replayed as CUDA graphs (above)."""
    import torch

    return torch.cuda.is_available() and os.environ.get("KERAS_GEMMA_TORCH_CUDAGRAPHS") == "1"


def _torch_compile_mode():
    """`KERAS_GEMMA_TORCH_COMPILE`: "1" (default), "step" or "0"."""
    mode = os.environ.get("KERAS_GEMMA_TORCH_COMPILE", "1")
    if mode not in ("1", "step", "0"):
        raise ValueError(
            f"KERAS_GEMMA_TORCH_COMPILE={mode!r} is not a choice: use 1 (compile one "
            "decoder block per kind; the default), step (compile the decode step as one "
            "graph) or 0 (eager)."
        )
    return mode


def _tensorflow_xla():
    """`KERAS_GEMMA_TF_XLA`: "1" (default: XLA) or "0" (TensorFlow graphs)."""
    mode = os.environ.get("KERAS_GEMMA_TF_XLA", "1")
    if mode not in ("1", "0"):
        raise ValueError(
            f"KERAS_GEMMA_TF_XLA={mode!r} is not a choice: use 1 (compile with XLA; the "
            "default) or 0 (run as TensorFlow graphs without XLA)."
        )
    return mode == "1"


def _generated_mask(token_ids, prompt_mask, stop_token_ids):
    """True for the prompt and generated tokens up to and including the first
    stop token after the prompt; False after it."""
    if stop_token_ids is None:
        return ops.ones_like(token_ids, dtype="bool")
    generated = ops.logical_not(ops.cast(prompt_mask, "bool"))
    stops = ops.cast(any_equal(token_ids, stop_token_ids, generated), "int32")
    stops_before = ops.cumsum(stops, axis=-1) - stops
    return ops.equal(stops_before, 0)


@keras.saving.register_keras_serializable(package="keras_gemma")
class GreedySampler(KerasHubGreedySampler):
    """KerasHub's greedy sampler (what `sampler="greedy"` gives), minus the
    work a greedy choice does not need: the largest logit is the most
    probable token, so there is no softmax over the vocabulary, and on JAX
    the argmax takes two vectorized passes (`first_argmax`). On gemma3_270m
    (262144 logits) the two cost ~2.5 ms per decoded token on JAX on CPU.
    The tokens are KerasHub's (tested), except where the float32 softmax
    rounds two different logits to one probability, where this picks the
    larger logit."""

    def compute_probabilities(self, logits):
        return ops.cast(logits, "float32")  # Ordered as the probabilities.

    def get_next_token(self, logits):
        if keras.config.backend() == "jax":
            return first_argmax(logits)
        return ops.argmax(logits, axis=-1)


def first_argmax(x):
    """`ops.argmax(x, axis=-1)` (the first largest, or the first NaN) as a
    maximum, then the smallest position holding it: XLA on CPU runs an
    argmax as one scalar loop over (value, position) pairs, ~3x slower
    than the two vectorized reductions over 262144 values. Positions are
    float32, exact up to 2**24."""
    largest = ops.max(x, axis=-1, keepdims=True)
    candidates = ops.logical_or(ops.equal(x, largest), ops.isnan(x))
    positions = ops.arange(x.shape[-1], dtype="float32")
    first = ops.min(ops.where(candidates, positions, float("inf")), axis=-1)
    return ops.cast(first, "int32")


SAMPLER_NAMES = ("greedy", "top_k", "top_p", "random", "beam", "contrastive")


def resolve_sampler(sampler):
    """A sampler from a name (any case) or a KerasHub sampler or config."""
    if isinstance(sampler, str):
        name = sampler.lower()
        if name not in SAMPLER_NAMES:
            raise ValueError(
                f"Unknown sampler {sampler!r}; use one of {', '.join(SAMPLER_NAMES)}, or a "
                "keras_hub.samplers.Sampler with its settings (e.g. TopKSampler(k=5, temperature=0.7))."
            )
        return GreedySampler() if name == "greedy" else keras_hub.samplers.get(name)
    if isinstance(sampler, dict):  # A config: saved (a class name), or by short name.
        if sampler.get("class_name") in SAMPLER_NAMES:
            return keras_hub.samplers.get(sampler)
        return keras.saving.deserialize_keras_object(sampler)
    return sampler


def checked_sampler(gemma_lm):
    """Check the model's sampler again: it may have changed since
    `compile()` (`sampler.k = 0` failed deep in the loop; a temperature of
    0 returned the prompt; `gemma_lm.sampler = "top_k"`). Returns a key
    that changes with the sampler and its settings, which compiled
    generation functions hold as constants."""
    if isinstance(gemma_lm.sampler, (str, dict)):
        gemma_lm.sampler = resolve_sampler(gemma_lm.sampler)
    check_sampler(gemma_lm.sampler, gemma_lm.backbone.vocabulary_size)
    return id(gemma_lm.sampler), repr(gemma_lm.sampler.get_config())


def check_sampler(sampler, vocabulary_size=None):
    """Reject sampler settings that would silently misbehave (`k` is checked
    against the vocabulary where it is given)."""
    if not isinstance(sampler, Sampler):
        raise ValueError(
            f"sampler must be a name ({', '.join(SAMPLER_NAMES)}) or a keras_hub Sampler; "
            f"got {sampler!r}."
        )
    name = type(sampler).__name__
    temperature = getattr(sampler, "temperature", 1.0)
    if not _is_number(temperature) or not 0 < temperature < math.inf:
        raise ValueError(
            f"{name}: temperature must be a finite number > 0, got {temperature!r}. Use "
            "sampler='greedy' for deterministic decoding."
        )
    k = getattr(sampler, "k", None)
    if k is not None and not _is_positive_integer(k):
        raise ValueError(f"{name}: k must be an integer >= 1, got {k!r}.")
    if k is not None and vocabulary_size is not None and k > vocabulary_size:
        raise ValueError(f"{name}: k={k} is more than the vocabulary's {vocabulary_size} tokens.")
    p = getattr(sampler, "p", None)
    if p is not None and not (_is_number(p) and 0 < p <= 1):
        raise ValueError(f"{name}: p must be in (0, 1], got {p!r}.")
    num_beams = getattr(sampler, "num_beams", None)
    if num_beams is not None and not _is_positive_integer(num_beams):
        raise ValueError(f"{name}: num_beams must be an integer >= 1, got {num_beams!r}.")
    alpha = getattr(sampler, "alpha", None)  # ContrastiveSampler's penalty weight.
    if alpha is not None and not (_is_number(alpha) and 0 <= alpha <= 1):
        raise ValueError(f"{name}: alpha must be in [0, 1], got {alpha!r}.")


def _is_positive_integer(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def _is_number(value):
    """A real number: Python's, NumPy's or a backend's scalar (not a bool)."""
    if isinstance(value, (bool, str, bytes)):
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _fits_faster_as_tensorflow_graph(backbone):
    """TensorFlow without a GPU trains a 16-bit model faster as a graph:
    TensorFlow's oneDNN kernels use the CPU's bfloat16 instructions, its
    XLA runs 16-bit products as generic loops (0.32 vs 0.53 s per LoRA step
    on the cpu benchmark config; float32 is faster with XLA, 0.42 vs 0.50)."""
    if keras.config.backend() != "tensorflow":
        return False
    if backbone.dtype_policy.compute_dtype not in ("bfloat16", "float16"):
        return False
    return not computes_on_gpu()


def token_ids_or_none(stop_token_ids, vocabulary_size):
    """`stop_token_ids` as a tuple of ints in the vocabulary, or None (no
    stop tokens)."""
    if stop_token_ids is None:
        return None
    message = (
        "stop_token_ids must be 'auto', None or a list of token ids (ints), "
        f"got {stop_token_ids!r}. For pieces such as '<end_of_turn>', use "
        "`tokenizer.token_to_id(piece)` or set `preprocessor.stop_tokens`."
    )
    if isinstance(stop_token_ids, (str, bytes)) or not hasattr(stop_token_ids, "__iter__"):
        raise ValueError(message)
    try:
        ids = tuple(operator.index(token_id) for token_id in stop_token_ids)
    except TypeError:
        raise ValueError(message) from None
    outside = [token_id for token_id in ids if not 0 <= token_id < vocabulary_size]
    if outside:
        raise ValueError(
            f"stop_token_ids {outside} are not token ids of this model's vocabulary "
            f"(0 to {vocabulary_size - 1}); generation could never stop on them."
        )
    return ids or None


def _same_shape(x, shape, name, dtype):
    """`x` as a `dtype` tensor of `shape` (the token ids'), or a clear error."""
    x = ops.convert_to_tensor(x, dtype)
    if tuple(ops.shape(x)) != shape:
        raise ValueError(f"{name} must have the token ids' shape {shape}, got {tuple(ops.shape(x))}.")
    return x
