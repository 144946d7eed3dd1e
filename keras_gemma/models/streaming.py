"""Token-by-token generation that yields text as it is produced (the CLI)."""

import keras
import numpy as np
from keras import ops


def compiled_cached_call(gemma_lm):
    """`call_with_cache` compiled for the backend (JAX jit, TensorFlow XLA;
    PyTorch runs it eagerly without autograd). Returns
    `step(token_ids, cache, index) -> (logits, cache)`; each new input shape
    (the prefill length, then a single token) compiles once."""
    backend = keras.config.backend()
    if backend == "jax":
        import jax

        variables = gemma_lm.trainable_variables + gemma_lm.non_trainable_variables

        @jax.jit
        def pure_step(values, token_ids, cache, index):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                logits, _, cache = gemma_lm.call_with_cache(token_ids, cache, index)
            return logits, cache

        return lambda token_ids, cache, index: pure_step(
            [v.value for v in variables], token_ids, cache, index
        )
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=True, reduce_retracing=True)
        def tf_step(token_ids, cache, index):
            logits, _, cache = gemma_lm.call_with_cache(token_ids, cache, index)
            return logits, cache

        return lambda token_ids, cache, index: tf_step(
            token_ids, cache, tf.constant(index, "int32")
        )
    import torch

    def torch_step(token_ids, cache, index):
        with torch.no_grad():
            logits, _, cache = gemma_lm.call_with_cache(token_ids, cache, index)
        return logits, cache

    return torch_step


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
    prompt_ids = np.asarray(packed["token_ids"])[:, :length]
    if stop_token_ids == "auto":
        stop_token_ids = preprocessor.stop_token_ids
    stop_token_ids = set(stop_token_ids or ())

    step = compiled_cached_call(gemma_lm)
    cache = gemma_lm.backbone.empty_cache(1, max_length)
    logits, cache = step(prompt_ids, cache, 0)
    generated, emitted = [], ""
    for index in range(length, max_length):
        probabilities = gemma_lm.sampler.compute_probabilities(logits[:, -1, :])
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
            logits, cache = step(np.array([[token]], "int32"), cache, index)
