"""Token-by-token generation that yields text as it is produced (the CLI)."""

import keras
import numpy as np
from keras import ops

from keras_gemma.models.gemma_causal_lm import holds_variables
from keras_gemma.models.gemma_causal_lm import jax_compiler_options
from keras_gemma.models.gemma_causal_lm import length_bucket
from keras_gemma.models.gemma_causal_lm import prefill_bucket
from keras_gemma.models.gemma_causal_lm import variable_refs


class StreamingSteps:
    """`prefill(token_ids, cache, length) -> (logits, cache)`: the cache for
    the first `length` positions of the padded prompt `[1, P]` and the
    logits `[1, vocabulary]` after position `length - 1`;
    `decode(token_ids, cache, index) -> (logits, cache)` for one token at
    `index`. JAX and TensorFlow compile each once per shape (JAX `jit`,
    TensorFlow XLA); PyTorch runs them eagerly without autograd."""

    def __init__(self, gemma_lm):
        self.gemma_lm = gemma_lm
        self.variables = variable_refs(gemma_lm)
        self.compiled = []  # The jitted functions / tf.functions (tests count traces).
        backend = keras.config.backend()
        if backend == "jax":
            self.prefill, self.decode = self._jax(self._prefill), self._jax(self._decode)
        elif backend == "tensorflow":
            self.prefill, self.decode = self._tensorflow(self._prefill), self._tensorflow(self._decode)
        else:
            self.prefill, self.decode = self._torch(self._prefill), self._torch(self._decode)

    def _prefill(self, token_ids, cache, length):
        backbone = self.gemma_lm.backbone
        hidden_states, cache = backbone.call_with_cache(token_ids, cache, 0, cache_write_end=length)
        last = ops.take(hidden_states, ops.reshape(length - 1, (1,)), axis=1)
        return ops.squeeze(backbone.token_logits(last), axis=1), cache

    def _decode(self, token_ids, cache, index):
        hidden_states, cache = self.gemma_lm.backbone.call_with_cache(token_ids, cache, index)
        return ops.squeeze(self.gemma_lm.backbone.token_logits(hidden_states), axis=1), cache

    def _jax(self, step):
        import jax

        model = self.gemma_lm
        variables = model.trainable_variables + model.non_trainable_variables
        options = jax_compiler_options()

        def pure(values, token_ids, cache, position):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                return step(token_ids, cache, position)

        compiled = jax.jit(pure, compiler_options=options)
        self.compiled.append(compiled)
        return lambda token_ids, cache, position: compiled(
            [v.value for v in variables], token_ids, cache, np.int32(position)
        )

    def _tensorflow(self, step):
        import tensorflow as tf

        compiled = tf.function(step, jit_compile=True, reduce_retracing=True)
        self.compiled.append(compiled)
        return lambda token_ids, cache, position: compiled(
            token_ids, cache, tf.constant(position, "int32")
        )

    def _torch(self, step):
        import torch

        def eager(token_ids, cache, position):
            with torch.no_grad():
                return step(token_ids, cache, position)

        return eager


def streaming_steps(gemma_lm):
    """The model's `StreamingSteps` (one pair per model, reused by every
    call: each chat turn), built on first use and rebuilt when its
    variables change."""
    steps = getattr(gemma_lm, "_streaming_steps", None)
    if steps is None or not holds_variables(gemma_lm, steps.variables):
        steps = gemma_lm._streaming_steps = StreamingSteps(gemma_lm)
    return steps


def stream_text(gemma_lm, prompt, max_length=None, stop_token_ids="auto"):
    """Yield the continuation of `prompt` piece by piece.

    Uses the model's sampler (`gemma_lm.compile(sampler=...)`) and KV cache:
    one prefill pass over the prompt, then one cached step per token.
    Stops at a stop token (the preprocessor's `stop_tokens` for "auto") or
    at `max_length` tokens in all.
    """
    preprocessor = gemma_lm.preprocessor
    tokenizer = preprocessor.tokenizer
    max_length = max_length or preprocessor.sequence_length
    packed = preprocessor.generate_preprocess([prompt], sequence_length=max_length)
    length = int(np.asarray(packed["padding_mask"])[0].sum())
    if stop_token_ids == "auto":
        stop_token_ids = preprocessor.stop_token_ids
    stop_token_ids = set(stop_token_ids or ())

    steps = streaming_steps(gemma_lm)
    # Cache and prompt padded to buckets: calls of nearby lengths share the
    # compiled steps.
    slots = length_bucket(max_length)
    prompt_ids = np.zeros((1, prefill_bucket(length, slots)), "int32")
    prompt_ids[:, :length] = np.asarray(packed["token_ids"])[:, :length]
    cache = gemma_lm.backbone.empty_cache(1, slots)
    logits, cache = steps.prefill(prompt_ids, cache, length)
    generated, emitted = [], ""
    for index in range(length, max_length):
        probabilities = gemma_lm.sampler.compute_probabilities(logits)
        token = int(ops.convert_to_numpy(gemma_lm.sampler.get_next_token(probabilities))[0])
        if token in stop_token_ids:
            break
        generated.append(token)
        text = tokenizer.detokenize(np.array(generated, "int32"))
        text = text.numpy().decode("utf-8") if hasattr(text, "numpy") else str(text)
        if not text.endswith("\ufffd"):  # Wait for a multi-byte character to end.
            yield text[len(emitted):]
            emitted = text
        if index + 1 < max_length:
            logits, cache = steps.decode(np.array([[token]], "int32"), cache, index)
