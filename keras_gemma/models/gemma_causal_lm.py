import contextlib
import numbers
import os
import warnings

import keras
import keras_hub
import numpy as np
from keras import ops
from keras_hub.models import CausalLM
from keras_hub.src.utils.pipeline_model import _train_validation_split
from keras_hub.src.utils.tensor_utils import any_equal

from keras_gemma.checkpoints import loading
from keras_gemma.checkpoints.loading import CatalogPresets
from keras_gemma.devices import computes_on_gpu
from keras_gemma.layers.dense import adapters_merged_on_save
from keras_gemma.layers.direct_call import dynamo_is_tracing
from keras_gemma.layers.direct_call import shorten_keras_tracing
from keras_gemma.models import compiled_generation
from keras_gemma.models.gemma_backbone import GemmaBackbone
from keras_gemma.models.gemma_backbone import check_savable
from keras_gemma.models.gemma_backbone import weight_only_int8_by_default
from keras_gemma.models.gemma_causal_lm_preprocessor import INSTRUCTION_KEYS
from keras_gemma.models.gemma_causal_lm_preprocessor import GemmaCausalLMPreprocessor
from keras_gemma.models.gemma_causal_lm_preprocessor import HAS_TENSORFLOW
from keras_gemma.models.gemma_causal_lm_preprocessor import check_strings
from keras_gemma.models.gemma_causal_lm_preprocessor import instruction_columns
from keras_gemma.models.gemma_causal_lm_preprocessor import checked_max_new_tokens
from keras_gemma.models.gemma_causal_lm_preprocessor import positive_token_count
from keras_gemma.models.samplers import check_sampler
from keras_gemma.models.samplers import checked_sampler
from keras_gemma.models.samplers import resolve_sampler
from keras_gemma.models.samplers import sampled_vocabulary_size
from keras_gemma.models.samplers import samples_token_by_token
from keras_gemma.models.samplers import resolved_stop_token_ids
from keras_gemma.models.token_loss import ACCURACIES
from keras_gemma.models.token_loss import DEFAULT_LOGITS_PER_CHUNK
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
        check_savable(self.backbone, max_shard_size, preset_dir)
        with staged_preset(preset_dir) as staging, adapters_merged_on_save():
            super().save_to_preset(staging, max_shard_size=max_shard_size)

    def compile(self, optimizer="auto", loss="auto", *, sampler="greedy", jit_compile="auto", **kwargs):
        """Keras' `compile` (plus KerasHub's `sampler`), with other defaults.

        `loss="auto"` is `TokenCrossentropy`: Keras' sparse categorical
        cross-entropy from the logits (same values and gradients) keeping
        fewer logits-sized buffers (see `token_loss`). `weighted_metrics=
        "auto"` is `TokenAccuracy`: KerasHub's accuracy, exact with 16-bit
        logits. `jit_compile="auto"` compiles `fit()` and `generate()` on
        every backend (Keras compiles nothing on PyTorch, nor on TensorFlow
        without a GPU, where Gemma runs several times slower); except that
        TensorFlow's `fit()` of a 16-bit model on a CPU runs as a graph
        (oneDNN's bfloat16 kernels beat XLA's there).
        `KERAS_GEMMA_TORCH_COMPILE` (`1`, `step`, `0`) and
        `KERAS_GEMMA_TF_XLA=0` choose how (README, "Use from Python");
        `jit_compile=False` or `run_eagerly=True` turn compilation off.
        """
        tensorflow_graphs = keras.config.backend() == "tensorflow" and not compiled_generation.tensorflow_xla()
        self._xla_generate = jit_compile is True or (jit_compile == "auto" and not tensorflow_graphs)
        if jit_compile == "auto":
            eager_torch = keras.config.backend() == "torch" and compiled_generation.torch_compile_mode() == "0"
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
        self._compiled_variables = compiled_generation.variable_refs(self)

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

    def get_config(self):
        """KerasHub's config, plus what `keras.models.load_model` restores
        after `compile()`: the sampler, and whether the optimizer had
        variables (one saved before any training step loads unbuilt, as
        saved: built, Keras warned that it skipped the saved optimizer's 2
        variables for its 84, for a model saved right after `from_preset`).
        Not in the compile config: `keras.models.clone_model` compiles its
        plain `Functional` copy from that, and Keras' `compile()` takes no
        `sampler`."""
        config = super().get_config()
        if self.compiled:
            config["sampler"] = keras.saving.serialize_keras_object(self.sampler)
            config["optimizer_built"] = bool(getattr(self.optimizer, "built", False))
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        sampler = config.pop("sampler", None)
        optimizer_built = config.pop("optimizer_built", True)
        gemma_lm = super().from_config(config)
        if sampler is not None:
            gemma_lm.compile(sampler=_restored_sampler(sampler))
        gemma_lm._optimizer_built_when_saved = optimizer_built
        return gemma_lm

    def compile_from_config(self, config):
        """`keras.models.load_model` compiles the model as it was saved: the
        optimizer, loss and metrics (Keras skips a custom `compile()`, and
        the default optimizer then received the saved one's variables) and
        the sampler (see `get_config`). `jit_compile` is resolved again for
        the loading machine."""
        config = dict(config)
        # Files saved before 2026-12-07 keep these two in the compile config.
        sampler = config.pop("sampler", None)
        optimizer_built = config.pop("optimizer_built", getattr(self, "_optimizer_built_when_saved", True))
        config = keras.saving.deserialize_keras_object(config)
        config.pop("jit_compile", None)
        self.compile(**config, sampler=self.sampler if sampler is None else _restored_sampler(sampler))
        if self.built and optimizer_built:
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
            self._torch_decode_step = None
            torch_compile = self.jit_compile and not self.run_eagerly
            if keras.config.backend() == "torch" and torch_compile:
                # Prefill stays eager: one big pass.
                self._torch_decode_step = compiled_generation.TorchDecodeStep(self)
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
                compiled = compiled_generation.jax_generate_function(self) if self.jit_compile else self.generate_step
            else:
                compiled = super().make_generate_function()

            def generate_function(inputs, stop_token_ids=None):
                if self.preprocessor is None:  # Each batch, tf.data's too.
                    self._check_token_inputs(inputs)
                max_new_tokens = getattr(self, "_max_new_tokens", None)
                if isinstance(self.sampler, keras_hub.samplers.BeamSampler):
                    return _by_prompt_length(compiled, inputs, stop_token_ids, max_new_tokens)
                # Prompts of different lengths aligned at their ends, each
                # prefilled whole, where that saves decode steps.
                aligned = inputs
                if samples_token_by_token(self.sampler):
                    aligned = compiled_generation.aligned_for_generation(inputs, max_new_tokens, stop_token_ids)
                outputs = compiled(compiled_generation.with_prefill_bucket(aligned), stop_token_ids)
                outputs = compiled_generation.unaligned(outputs, aligned, width=ops.shape(inputs["token_ids"])[1])
                if max_new_tokens is None:
                    return outputs
                return compiled_generation.limited_to_new_tokens(outputs, inputs, max_new_tokens)

            generate_function.compiled = compiled  # For tests: tracing counts.
            self.generate_function = generate_function
        return self.generate_function

    def generate(self, inputs, max_length=None, stop_token_ids="auto", strip_prompt=False, max_new_tokens=None):
        """Generate text (or token ids without a preprocessor) from a
        prompt, a list of prompts or, as KerasHub's Gemma 3, `{"prompts": ...}`.

        `max_length` counts each row's prompt and new tokens together
        (KerasHub's meaning; default: the preprocessor's `sequence_length`);
        `max_new_tokens` (transformers' meaning) instead gives every prompt
        up to that many new tokens, whatever its length; a batch's prompts
        are then each prefilled whole (aligned at their ends), so a long
        prompt beside a short one costs no extra decode steps (with
        `max_length` too, where stop ids can end rows early and the
        prompts are 64+ tokens apart). Pass at most one.
        `stop_token_ids="auto"` stops on the preprocessor's `stop_tokens`
        (`<eos>`, plus `<end_of_turn>` for instruction-tuned presets); `None`
        generates up to the length limit.
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
        max_new_tokens = checked_max_new_tokens(max_new_tokens, max_length)
        if max_new_tokens is not None:
            max_length = self._length_for_new_tokens(inputs, max_new_tokens)
        if max_length is not None:
            max_length = positive_token_count(max_length, "max_length")
            self._check_room_for(inputs, max_length)
            if self.preprocessor is None and isinstance(inputs, dict):
                inputs = _padded_to(inputs, max_length)
            elif self.preprocessor is None and isinstance(getattr(inputs, "element_spec", None), dict):
                width = inputs.element_spec["token_ids"].shape[-1]
                if width is not None:  # Known before a batch is read.
                    _check_width(width, max_length)
                inputs = inputs.map(lambda batch: _padded_to_tf(batch, max_length))
        self.warn_past_context(max_length or getattr(self.preprocessor, "sequence_length", None))
        stop_token_ids = resolved_stop_token_ids(self, stop_token_ids)
        # A compiled TensorFlow function keeps the variables it was traced
        # with: after enable_lora / merge_lora / load_lora_weights it would
        # ignore new adapters or apply merged ones twice.
        traced = getattr(self, "_generate_variables", None)
        if traced is not None and not compiled_generation.holds_variables(self, traced):
            self.generate_function = None
        self._generate_variables = compiled_generation.variable_refs(self)
        if sampler_key != getattr(self, "_generate_sampler_key", None):
            self.generate_function = None
        self._generate_sampler_key = sampler_key
        # Read here, not while tracing (a TensorFlow trace cannot).
        sampled = sampled_vocabulary_size(self)
        if sampled != getattr(self, "_sampled_vocabulary_size", None):
            self.generate_function = None
        self._sampled_vocabulary_size = sampled
        self._max_new_tokens = max_new_tokens  # Read by the generate function.
        try:
            return super().generate(
                inputs, max_length=max_length, stop_token_ids=stop_token_ids,
                strip_prompt=strip_prompt,
            )
        finally:
            self._max_new_tokens = None

    def _length_for_new_tokens(self, inputs, max_new_tokens):
        """The `max_length` that leaves the longest prompt `max_new_tokens`
        new tokens (the shorter prompts' extra tokens are cut off after
        generation, see `compiled_generation.limited_to_new_tokens`)."""
        if hasattr(inputs, "element_spec"):
            raise ValueError(
                "max_new_tokens counts the prompts' tokens first, which a tf.data.Dataset "
                "cannot show without being read; pass max_length (prompt and new tokens "
                "together) or the prompts as a list."
            )
        if self.preprocessor is not None:
            return max(self.preprocessor.prompt_token_counts(inputs)) + max_new_tokens
        self._check_token_inputs(inputs)
        prompt_mask = ops.convert_to_numpy(inputs["padding_mask"]).astype(bool)
        # The token ids' width stays (generation fills it, as without max_new_tokens).
        return max(prompt_mask.shape[-1], int(prompt_mask.sum(axis=-1).max()) + max_new_tokens)

    def score(self, token_ids, padding_mask=None, scoring_mode="logits", layer_intercept_fn=None, target_ids=None):
        """Per-token scores of `token_ids` `[batch, seq]` (KerasHub's
        `GemmaCausalLM.score`): `scoring_mode="logits"` gives the logits
        `[batch, seq, vocabulary_size]` (`call`'s), `"loss"` the
        cross-entropy of each position's logits against `target_ids`
        `[batch, seq]`, in float32, `[batch, seq]`. Next-token targets are
        the token ids shifted left, `ops.roll(token_ids, -1, axis=1)`
        (their last column scores nothing real). `padding_mask` defaults
        to all ones. The losses are computed from a chunk of tokens' logits
        at a time. On PyTorch, call it under `torch.no_grad()` unless you
        differentiate it: autograd otherwise keeps every activation.

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
        hidden_states = backbone.layer_norm(x)
        if scoring_mode == "logits":
            return backbone.token_logits(hidden_states)
        target_ids = _same_shape(target_ids, shape, "target_ids", "int32")
        self._check_in_vocabulary(target_ids, "target_ids")
        return _token_losses_in_chunks(backbone, hidden_states, target_ids)

    def warn_past_context(self, max_length):
        """Warn when generating past the context the model was trained on:
        RoPE positions there were never seen, and the text degrades."""
        context = self.backbone.context_length
        if max_length is not None and max_length > context:
            warnings.warn(
                f"max_length={max_length} is past the {context} tokens that Gemma models of "
                "this architecture were trained on; text beyond them degrades.",
                stacklevel=3,
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
        if np.iinfo(dtype).max < self.backbone.vocabulary_size - 1:  # New tokens would wrap.
            raise ValueError(
                f"generate() got token_ids of dtype {dtype}, which cannot hold this model's "
                f"token ids (up to {self.backbone.vocabulary_size - 1}); pass int32."
            )
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
        force = force or not compiled_generation.holds_variables(self, getattr(self, "_test_variables", ()))
        self._test_variables = compiled_generation.variable_refs(self)
        return super().make_test_function(force=force)

    def make_predict_function(self, force=False):
        force = force or not compiled_generation.holds_variables(self, getattr(self, "_predict_variables", ()))
        self._predict_variables = compiled_generation.variable_refs(self)
        return super().make_predict_function(force=force)

    def fit(
        self, x=None, y=None, batch_size=None, sample_weight=None, validation_data=None,
        validation_split=None, shuffle=True, **kwargs,
    ):
        """Keras' `fit`. In-memory data (lists of strings, instruction
        dicts, arrays) is reshuffled every epoch, as Keras shuffles arrays:
        KerasHub's pipeline sliced it in order, and Keras then warned that
        `shuffle=True` was ignored. Datasets are taken as they are."""
        self._check_instruction_data(x)
        if self.preprocessor is not None and isinstance(x, (list, tuple)):
            if not x:
                raise ValueError("fit() got no examples: `x` is an empty list.")
            check_strings(x, "fit()'s texts")
        _check_batched(x)
        self._check_no_targets(x, y, sample_weight)
        if self.preprocessor is not None and _is_texts(validation_data):
            # Texts, as `x` takes them; Keras would unpack a list as `(x, y)`.
            validation_data = (list(validation_data),)
        if validation_data is not None and not hasattr(validation_data, "element_spec"):
            validation_x, *validation_rest = keras.utils.unpack_x_y_sample_weight(validation_data)
            self._check_instruction_data(validation_x)
            self._check_no_targets(validation_x, *validation_rest)
        if _in_memory(x):
            x = _strings_as_arrays(x)  # KerasHub's splitter takes arrays, not lists.
        # Without TensorFlow, KerasHub's pipeline (Grain, or a clear error).
        # "batch" shuffles chunks of files read in pieces (HDF5); held in
        # memory, the examples are shuffled as a whole.
        if shuffle in (True, "batch") and HAS_TENSORFLOW and _in_memory(x):
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
        self._check_instruction_data(x)
        _check_batched(x)
        self._check_no_targets(x, y, sample_weight)
        with _variables_restored_on_error(self):
            return super().evaluate(x, y, batch_size=batch_size, sample_weight=sample_weight, **kwargs)

    def _check_instruction_data(self, x):
        """Before KerasHub slices the columns into a tf.data.Dataset, whose
        errors (mismatched lengths, misnamed keys) name no column."""
        if self.preprocessor is not None and isinstance(x, dict) and not set(x) & set(TOKEN_INPUTS):
            instruction_columns(x)

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

    def predict(self, x, *args, **kwargs):
        self._check_instruction_data(x)
        with _variables_restored_on_error(self):
            return super().predict(x, *args, **kwargs)

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
        if compiled_with is not None and not compiled_generation.holds_variables(self, compiled_with):
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

            compiled_step = torch.compile(self.train_step, **compiled_generation.recompile_budget())
            # Keras' optimizers with weight decay fill a cache at their first
            # update; filled inside the compiled step, it fails Dynamo's
            # guards at the second, which traced and compiled the whole step
            # again (gemma3_270m: 40-80 s). Filled here, before tracing.
            for optimizer in (self.optimizer, getattr(self.optimizer, "inner_optimizer", None)):
                if hasattr(optimizer, "_use_weight_decay"):
                    for variable in self.trainable_weights:
                        optimizer._use_weight_decay(variable)

            def clear_gradients():
                for variable in self.trainable_weights:
                    variable.value.grad = None

            def one_step_on_data(data):
                # Gradients left by an eager step (an earlier `fit` with
                # jit_compile=False) made the traced step leave a gradient
                # tensor as Keras' global call context: every later layer
                # call in the process failed.
                clear_gradients()
                with torch._dynamo.config.patch(trace_autograd_ops=True):
                    logs = compiled_step(data[0])
                # Keras' step clears the gradients before the backward pass,
                # so the compiled step would find them unset at the first
                # call and set at the second: Dynamo compiled the step twice
                # (10+ s each on a CPU). Cleared after the update, they are
                # unset at every call, and no gradient memory is held between
                # steps.
                clear_gradients()
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
        sampler fills only the positions that were padding. Inputs with
        `"left_padding"` hold prompts aligned at their ends
        (`compiled_generation.aligned_at_prompt_ends`): every prompt is
        prefilled whole, and decoding starts after all of them.
        """
        token_ids, padding_mask = inputs["token_ids"], inputs["padding_mask"]
        left_padding = inputs.get("left_padding")
        prompt_token_ids = token_ids
        if isinstance(stop_token_ids, np.ndarray):  # KerasHub's public method takes them.
            stop_token_ids = tuple(stop_token_ids.tolist())
        # The stop checks (KerasHub's too) read every position after the
        # prompt, those not generated yet included: padding that is a stop
        # id (`<eos>` as the pad, `<pad>` among the stop ids) ended
        # generation before it began. Those positions hold an id that is not
        # a stop id until sampled.
        filler = None
        if stop_token_ids is not None and len(stop_token_ids):
            filler = min(set(range(len(stop_token_ids) + 1)) - set(stop_token_ids))
            token_ids = ops.where(padding_mask, token_ids, ops.cast(filler, token_ids.dtype))
        batch_size, max_length = ops.shape(token_ids)
        prompt_lengths = ops.sum(ops.cast(padding_mask, "int32"), axis=-1)
        start = ops.min(prompt_lengths)
        # Prefill in one pass. Decoding restarts at the shortest prompt's end
        # and feeds the later positions again, so only earlier ones are kept.
        # Only the cache and hidden states are needed: no vocabulary logits
        # for the whole padded prompt.
        # Token-by-token samplers only need the cache before `start`, so the
        # prefill covers just a bucket of positions (`with_prefill_bucket`);
        # contrastive search reads the hidden states of every position.
        token_by_token = samples_token_by_token(self.sampler)
        prefill_ids = inputs.get("prefill_token_ids", token_ids) if token_by_token else token_ids
        torch_decode_step = getattr(self, "_torch_decode_step", None)
        torch_loop = torch_decode_step is not None and token_by_token
        # PyTorch compiles its decode step per shape (minutes for a big
        # model): lengths up to the same bucket share one step.
        buffer, buffer_mask = (
            compiled_generation.padded_to_bucket(token_ids, padding_mask) if torch_loop else (token_ids, padding_mask)
        )
        cache = self.backbone.empty_cache(batch_size, ops.shape(buffer)[1])
        hidden_states, cache = self.backbone.call_with_cache(
            prefill_ids, cache, 0, cache_write_end=start, left_padding=left_padding
        )

        if torch_loop:
            token_ids = compiled_generation.python_decode_loop(
                torch_decode_step, buffer, cache, start, buffer_mask, stop_token_ids,
                end=max_length, left_padding=left_padding,
            )[:, :max_length]
        else:

            def next_token_logits(prompt, cache, index):
                # Feed the token before `index`; its logits predict `index`.
                # Beam and contrastive search feed `batch * beams` rows.
                previous = ops.slice(prompt, [0, index - 1], [ops.shape(prompt)[0], 1])
                return self._one_token_step(previous, cache, index - 1, left_padding)

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
        generated = compiled_generation.generated_mask(token_ids, padding_mask, stop_token_ids)
        if filler is not None:  # Positions never sampled get their padding back.
            unsampled = ops.logical_and(ops.logical_not(generated), ops.equal(token_ids, filler))
            token_ids = ops.where(unsampled, prompt_token_ids, token_ids)
        return {"token_ids": token_ids, "padding_mask": generated}

    def _one_token_step(self, token_ids, cache, index, left_padding=None):
        """Sampling logits and hidden states `[batch, ...]` for the `[batch,
        1]` tokens at position (column) `index`, and the updated cache."""
        hidden_states, cache = self.backbone.call_with_cache(
            token_ids, cache, index, left_padding=left_padding
        )
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

    def _decode_body(self, token_ids, cache, index, mask, stop_token_ids, left_padding=None):
        """One decode step, as the sampler's loop body does it: feed the
        token before `index`, sample position `index` (prompt positions keep
        their token). Returns `(token_ids, cache, done)` where `done` is true
        once every row has produced a stop token."""
        logits, cache = self._decode_logits(token_ids, cache, index, left_padding)
        token_ids, done = self._write_sampled_token(token_ids, logits, index, mask, stop_token_ids)
        return token_ids, cache, done

    def _decode_logits(self, token_ids, cache, index, left_padding=None):
        """The model's part of a decode step: `(logits for position index,
        cache)`, fed the token before `index`."""
        logits, _, cache = self._one_token_step(
            _column(token_ids, index - 1), cache, index - 1, left_padding
        )
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


def _token_losses_in_chunks(backbone, hidden_states, target_ids):
    """Each token's cross-entropy (float32) against `target_ids`, from the
    logits of a chunk of tokens at a time: a long document's logits (1 GiB
    per 1024 tokens of Gemma 3's vocabulary in float32) never exist whole."""
    batch_size, length = ops.shape(target_ids)
    tokens = batch_size * length
    if tokens == 0:
        return ops.zeros((batch_size, length), "float32")
    chunk = min(tokens, max(1, DEFAULT_LOGITS_PER_CHUNK // backbone.vocabulary_size))
    padding = -tokens % chunk
    hidden_states = ops.pad(ops.reshape(hidden_states, (tokens, -1)), [[0, padding], [0, 0]])
    targets = ops.pad(ops.reshape(target_ids, (tokens,)), [[0, padding]])

    def chunk_losses(chunk_inputs):
        hidden, labels = chunk_inputs
        logits = ops.cast(backbone.token_logits(hidden), "float32")
        return keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)

    chunks = (
        ops.reshape(hidden_states, (-1, chunk, ops.shape(hidden_states)[-1])),
        ops.reshape(targets, (-1, chunk)),
    )
    if _is_traced(hidden_states):
        # A compiled loop: XLA ran unrolled chunks side by side (2 GiB of
        # logits for 2048 tokens under jax.jit, one chunk's with this).
        losses = ops.map(chunk_losses, chunks)
    else:  # Eagerly each chunk's logits are freed before the next.
        losses = ops.stack([chunk_losses((chunks[0][i], chunks[1][i])) for i in range(ops.shape(chunks[1])[0])])
    return ops.reshape(ops.reshape(losses, (-1,))[:tokens], (batch_size, length))


def _column(x, i):
    """Column `i` (a tensor) of `x`, gathered: slicing at a tensor index
    breaks the graph."""
    return ops.take(x, ops.reshape(i, (1,)), axis=1)


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
        # Objects: a fixed-width string array pads every text to the longest.
        return np.asarray(x, dtype=object)
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
    if isinstance(inputs, np.ndarray) and inputs.ndim == 0:  # np.array("hi"): one prompt.
        inputs = inputs.item()
    if isinstance(inputs, bytes):
        return inputs.decode("utf-8")
    if inputs is None or isinstance(inputs, numbers.Number):
        raise ValueError(
            "generate() takes a prompt (a string), a list of prompts or "
            f"{{'prompts': [...]}}; got {type(inputs).__name__} {inputs!r}."
        )
    check_strings(inputs, "generate()'s prompts")
    return inputs


def _restored_sampler(sampler):
    """A saved sampler, or greedy with a warning where it cannot be used
    (a class not registered in this process, settings `compile()` now
    refuses): the model and its weights still load."""
    try:
        sampler = resolve_sampler(sampler)
        check_sampler(sampler)
    except (TypeError, ValueError) as e:
        warnings.warn(
            f"The saved sampler cannot be used ({e}); the model generates greedily. "
            "Choose one with compile(sampler=...).",
            stacklevel=3,
        )
        return "greedy"
    return sampler


def _by_prompt_length(compiled, inputs, stop_token_ids, max_new_tokens=None):
    """Beam search on each group of rows whose prompts have one length.
    KerasHub's beam search starts at the shortest prompt's end and, at the
    longer prompts' positions, still splits and scores beams on tokens the
    prompt then replaces: every row but the shortest came out wrong. With
    `max_new_tokens` each group searches over its own `length +
    max_new_tokens` columns: the best longer beam, cut short, is not the
    best beam of that length."""
    lengths = ops.convert_to_numpy(inputs["padding_mask"]).astype(bool).sum(axis=-1)
    if len(set(lengths.tolist())) == 1 and max_new_tokens is None:
        return compiled(compiled_generation.with_prefill_bucket(inputs), stop_token_ids)
    token_ids = ops.convert_to_numpy(inputs["token_ids"]).copy()
    padding_mask = ops.convert_to_numpy(inputs["padding_mask"]).astype(bool)
    for length in sorted(set(lengths.tolist())):
        rows = np.flatnonzero(lengths == length)
        width = token_ids.shape[1] if max_new_tokens is None else length + max_new_tokens
        group = {"token_ids": token_ids[rows, :width], "padding_mask": padding_mask[rows, :width]}
        out = compiled(compiled_generation.with_prefill_bucket(group), stop_token_ids)
        token_ids[rows, :width] = ops.convert_to_numpy(out["token_ids"])
        padding_mask[rows, :width] = ops.convert_to_numpy(out["padding_mask"])
    return {"token_ids": ops.convert_to_tensor(token_ids), "padding_mask": ops.convert_to_tensor(padding_mask)}


def _padded_to(inputs, length):
    """Token-id inputs padded to `length` columns: without a preprocessor
    generation fills the prompts' padding, so their width is the length
    (KerasHub ignores `max_length` there)."""
    token_ids = ops.convert_to_numpy(inputs["token_ids"])
    width = token_ids.shape[-1]
    _check_width(width, length)
    padding = [(0, 0)] * (token_ids.ndim - 1) + [(0, length - width)]
    padded = dict(inputs, token_ids=np.pad(token_ids, padding))
    if "padding_mask" in inputs:
        padded["padding_mask"] = np.pad(ops.convert_to_numpy(inputs["padding_mask"]), padding)
    return padded


def _check_width(width, length):
    if length < width:
        raise ValueError(
            f"max_length={length} is shorter than the token_ids' {width} "
            "columns, which generation fills; pass a max_length of at "
            f"least {width}, or none (the width is the length)."
        )


def _padded_to_tf(batch, length):
    """`_padded_to` for a batch of a `tf.data.Dataset` (its max_length was
    ignored: the dataset's width was the length)."""
    import tensorflow as tf

    width = tf.shape(batch["token_ids"])[-1]
    tf.debugging.assert_less_equal(
        width, length, message=f"max_length={length} is shorter than the token_ids' columns, which generation fills"
    )
    padding = [[0, 0], [0, length - width]]
    padded = dict(batch, token_ids=tf.pad(batch["token_ids"], padding))
    if "padding_mask" in batch:
        padded["padding_mask"] = tf.pad(batch["padding_mask"], padding)
    return padded


def _is_texts(x):
    """A list, tuple or 1-D array of strings."""
    if isinstance(x, np.ndarray):
        return x.ndim == 1 and x.dtype.kind in "USO" and all(isinstance(v, (str, bytes)) for v in x)
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(v, str) for v in x)


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


def _same_shape(x, shape, name, dtype):
    """`x` as a `dtype` tensor of `shape` (the token ids'), or a clear error."""
    x = ops.convert_to_tensor(x, dtype)
    if tuple(ops.shape(x)) != shape:
        raise ValueError(f"{name} must have the token ids' shape {shape}, got {tuple(ops.shape(x))}.")
    return x
