"""Samplers for `GemmaCausalLM.generate()`: names resolved to KerasHub
samplers (greedy to our own, faster `GreedySampler`), their settings and
stop tokens checked before anything is compiled."""

import math
import numbers
import operator

import keras
import keras_hub
from keras import ops
from keras_hub.samplers import GreedySampler as KerasHubGreedySampler
from keras_hub.samplers import Sampler


SAMPLER_NAMES = ("greedy", "top_k", "top_p", "random", "beam", "contrastive")
# Smaller ones are greedy decoding in all but name, and float32 logits
# divided by ~1e-38 overflow.
MIN_TEMPERATURE = 1e-6


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
    # Ours takes the largest logit, whatever the temperature.
    temperature = 1.0 if isinstance(sampler, GreedySampler) else getattr(sampler, "temperature", 1.0)
    if not _is_number(temperature) or not MIN_TEMPERATURE <= temperature < math.inf:
        # Logits divided by a temperature near 1e-38 overflow float32: NaN
        # probabilities, and generation silently produced nothing.
        raise ValueError(
            f"{name}: temperature must be a finite number >= {MIN_TEMPERATURE:g}, got "
            f"{temperature!r}. Use sampler='greedy' for deterministic decoding."
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
    if getattr(sampler, "return_all_beams", False):  # generate() failed with a shape error.
        raise ValueError(
            f"{name}: return_all_beams=True is not supported: generate() returns one "
            "sequence per prompt. Use return_all_beams=False."
        )
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


def resolved_stop_token_ids(gemma_lm, stop_token_ids):
    """`generate()`'s `stop_token_ids` as a tuple of ids or None (none):
    "auto" is the preprocessor's stop tokens (left "auto" without a
    preprocessor, for KerasHub's error that explains)."""
    if isinstance(stop_token_ids, str) and stop_token_ids == "auto":
        if gemma_lm.preprocessor is None:
            return stop_token_ids
        # None, not an empty tuple, for no stop tokens: KerasHub's samplers
        # take None (an empty tuple crashed them).
        return tuple(gemma_lm.preprocessor.stop_token_ids) or None
    return token_ids_or_none(stop_token_ids, gemma_lm.backbone.vocabulary_size)


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


def samples_token_by_token(sampler):
    """Whether the sampler is a plain next-token sampler (greedy, top-k,
    top-p, random...) whose loop `_decode_body` reproduces; beam and
    contrastive search keep their own loops."""
    return type(sampler).__call__ is Sampler.__call__
