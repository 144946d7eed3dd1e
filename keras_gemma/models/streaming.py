"""Token-by-token generation that yields text as it is produced (the CLI)."""

import keras
import numpy as np
from keras import ops

from keras_gemma.models.compiled_generation import holds_variables
from keras_gemma.models.compiled_generation import jax_compiler_options
from keras_gemma.models.compiled_generation import length_bucket
from keras_gemma.models.compiled_generation import prefill_bucket
from keras_gemma.models.compiled_generation import variable_refs
from keras_gemma.models.gemma_causal_lm_preprocessor import checked_max_new_tokens
from keras_gemma.models.gemma_causal_lm_preprocessor import positive_token_count
from keras_gemma.models.samplers import checked_sampler
from keras_gemma.models.samplers import sampled_vocabulary_size
from keras_gemma.models.samplers import samples_token_by_token
from keras_gemma.models.samplers import resolved_stop_token_ids


class StreamingSteps:
    """`prefill(token_ids, cache, start, end) -> (logits, cache)`: the
    padded chunk `[1, P]` of tokens at positions `start ...` written to the
    cache up to position `end` (its real tokens), and the logits `[1,
    vocabulary]` after position `end - 1`; `decode(token_ids, cache, index)
    -> (logits, cache)` for one token at `index`. JAX and TensorFlow compile
    each once per shape (JAX `jit`, TensorFlow XLA); PyTorch runs them
    eagerly without autograd.

    `conversation` is the last call's `(token_ids, cache)`: the cache holds
    those tokens' keys and values, so the next call (the next chat turn,
    whose prompt starts with this one's prompt and reply) prefills only
    its new tokens.
    """

    def __init__(self, gemma_lm):
        self.gemma_lm = gemma_lm
        self.variables = variable_refs(gemma_lm)
        self.sampled_vocabulary_size = sampled_vocabulary_size(gemma_lm)
        self.compiled = []  # The jitted functions / tf.functions (tests count traces).
        self.conversation = None
        backend = keras.config.backend()
        if backend == "jax":
            self.prefill, self.decode = self._jax(self._prefill), self._jax(self._decode)
        elif backend == "tensorflow":
            self.prefill, self.decode = self._tensorflow(self._prefill), self._tensorflow(self._decode)
        else:
            self.prefill, self.decode = self._torch(self._prefill), self._torch(self._decode)

    def _prefill(self, token_ids, cache, start, end):
        backbone = self.gemma_lm.backbone
        hidden_states, cache = backbone.call_with_cache(token_ids, cache, start, cache_write_end=end)
        last = ops.take(hidden_states, ops.reshape(end - start - 1, (1,)), axis=1)
        last = ops.squeeze(last, axis=1)
        return self.gemma_lm.sampling_logits(last, self.sampled_vocabulary_size), cache

    def _decode(self, token_ids, cache, index):
        hidden_states, cache = self.gemma_lm.backbone.call_with_cache(token_ids, cache, index)
        hidden_states = ops.squeeze(hidden_states, axis=1)
        return self.gemma_lm.sampling_logits(hidden_states, self.sampled_vocabulary_size), cache

    def resume(self, token_ids, slots):
        """`(start, cache)`: a `slots`-position cache holding the keys and
        values of `token_ids[:start]`, reused from `conversation` (the
        longest common prefix, leaving at least one token to prefill), or
        `(0, empty cache)`."""
        empty = self.gemma_lm.backbone.empty_cache(1, slots)
        if self.conversation is None:
            return 0, empty
        cached_ids, cache = self.conversation
        limit = min(len(cached_ids), len(token_ids) - 1)
        differs = np.flatnonzero(cached_ids[:limit] != token_ids[:limit])
        start = int(differs[0]) if differs.size else limit
        # Positions after `start` stay in the cache: masked as future
        # positions and overwritten, unless a ring buffer has wrapped (its
        # slots then hold them in place of older positions still needed).
        wrapped = any(len(cached_ids) > key.shape[1] for key, _ in cache)
        if start == 0 or (start < len(cached_ids) and wrapped):
            return 0, empty
        resized = []
        for (key, value), (new_key, _) in zip(cache, empty):
            grow = new_key.shape[1] - key.shape[1]
            if grow < 0 or (grow > 0 and len(cached_ids) > key.shape[1]):
                return 0, empty  # A smaller cache, or a wrapped ring resized.
            # Slot = position while nothing has wrapped: zeros at the end.
            padding = ((0, 0), (0, grow), (0, 0), (0, 0))
            resized.append((ops.pad(key, padding), ops.pad(value, padding)) if grow else (key, value))
        return start, tuple(resized)

    def _jax(self, step):
        import jax

        model = self.gemma_lm
        variables = model.trainable_variables + model.non_trainable_variables
        options = jax_compiler_options()

        def pure(values, token_ids, cache, *positions):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                return step(token_ids, cache, *positions)

        compiled = jax.jit(pure, compiler_options=options)
        self.compiled.append(compiled)
        return lambda token_ids, cache, *positions: compiled(
            [v.value for v in variables], token_ids, cache, *map(np.int32, positions)
        )

    def _tensorflow(self, step):
        import tensorflow as tf

        compiled = tf.function(step, jit_compile=True, reduce_retracing=True, autograph=False)
        self.compiled.append(compiled)
        return lambda token_ids, cache, *positions: compiled(
            token_ids, cache, *(tf.constant(p, "int32") for p in positions)
        )

    def _torch(self, step):
        import torch

        def eager(token_ids, cache, *positions):
            with torch.no_grad():
                return step(token_ids, cache, *positions)

        return eager


def streaming_steps(gemma_lm):
    """The model's `StreamingSteps` (one pair per model, reused by every
    call: each chat turn), built on first use and rebuilt when its
    variables change."""
    steps = getattr(gemma_lm, "_streaming_steps", None)
    sampler_key = checked_sampler(gemma_lm)
    if (
        steps is None
        or not holds_variables(gemma_lm, steps.variables)
        or steps.sampled_vocabulary_size != sampled_vocabulary_size(gemma_lm)
        or steps.sampler_key != sampler_key
    ):
        steps = gemma_lm._streaming_steps = StreamingSteps(gemma_lm)
        steps.sampler_key = sampler_key
    return steps


def stream_text(gemma_lm, prompt, max_length=None, stop_token_ids="auto", resume=False, max_new_tokens=None):
    """Yield the continuation of `prompt` piece by piece.

    Uses the model's sampler (`gemma_lm.compile(sampler=...)`) and KV cache:
    one prefill pass over the prompt, then one cached step per token.
    Stops at a stop token (the preprocessor's `stop_tokens` for "auto"),
    which is not yielded (`generate()`'s text keeps a stop token that is not
    a special token, e.g. `<end_of_turn>`), or at `max_length` tokens in all
    (or after `max_new_tokens` new ones). With `resume=True` the prefill starts
    where this prompt's tokens leave the previous call's prompt and
    continuation (a chat's next turn), whose keys and values are still in
    the cache; only valid while the model's weights are unchanged.
    """
    if isinstance(prompt, bytes):
        raise ValueError("stream_text takes the prompt as a string; decode the bytes first, e.g. prompt.decode('utf-8').")
    if not isinstance(prompt, str):
        raise ValueError(
            f"stream_text streams one prompt (a string); got a "
            f"{type(prompt).__name__}. For several prompts at once use generate()."
        )
    # generate()'s checks of the same arguments.
    checked_sampler(gemma_lm)
    if not samples_token_by_token(gemma_lm.sampler):
        raise ValueError(
            f"{type(gemma_lm.sampler).__name__} searches over whole sequences; "
            "streaming samples one token at a time. Use generate() for beam or "
            "contrastive search."
        )
    preprocessor = gemma_lm.preprocessor
    tokenizer = preprocessor.tokenizer
    max_new_tokens = checked_max_new_tokens(max_new_tokens, max_length)
    if max_new_tokens is not None:
        max_length = preprocessor.prompt_token_count(prompt) + max_new_tokens
    if max_length is not None:
        max_length = positive_token_count(max_length, "max_length")
    max_length = max_length or preprocessor.sequence_length
    gemma_lm._check_room_for([prompt], max_length)
    gemma_lm.warn_past_context(max_length)
    packed = preprocessor.generate_preprocess([prompt], sequence_length=max_length)
    length = int(np.asarray(packed["padding_mask"])[0].sum())
    stop_token_ids = set(resolved_stop_token_ids(gemma_lm, stop_token_ids) or ())

    steps = streaming_steps(gemma_lm)
    # Cache and prompt chunk padded to buckets: calls of nearby lengths
    # share the compiled steps.
    slots = length_bucket(max_length)
    token_ids = np.asarray(packed["token_ids"])[0, :length]
    if resume:
        start, cache = steps.resume(token_ids, slots)
    else:
        start, cache = 0, gemma_lm.backbone.empty_cache(1, slots)
    chunk = np.zeros((1, prefill_bucket(length - start, slots - start)), "int32")
    chunk[0, : length - start] = token_ids[start:]
    logits, cache = steps.prefill(chunk, cache, start, length)
    steps.conversation = (token_ids, cache)
    generated, text, emitted = [], "", ""
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
            steps.conversation = (np.append(token_ids, generated), cache)
    if text != emitted:  # Bytes that never completed a character.
        yield text[len(emitted):]
