"""The one path every checkpoint importer ends in.

An importer (GGUF, HF safetensors, gemma_pytorch, ...) reads its format into
an `ImportedCheckpoint`: the backbone arguments, a function returning each
weight under its Hugging Face name as a numpy array, and the tokenizer. Then
`build_causal_lm` makes a normal keras_gemma model from it, assigning the
weights tensor by tensor (see `hf.load_hf_weights`) so that peak memory stays
near the model's own size.
"""

import dataclasses
import re
from typing import Callable

from keras_gemma.checkpoints import hf


@dataclasses.dataclass
class ImportedCheckpoint:
    source: str  # A path, for error messages.
    backbone_kwargs: dict
    # HF tensor name -> numpy array (HF `[out, in]` layout, norms as HF
    # stores them). Raises KeyError for a missing tensor.
    get_tensor: Callable
    # () -> (SentencePiece proto bytes, stop pieces). Called only when a
    # tokenizer is wanted: a backbone loads from the weights alone.
    read_tokenizer: Callable
    sequence_length: int = 1024
    # The file's own names of the tensors the model should read (not vision
    # towers or rotary tables); `get_tensor` adds those it reads to
    # `read_names`. One left unread after loading (a layer beyond the
    # config's depth, an untied output head) means the config does not
    # describe the file: refused, as the model would compute something else.
    stored_names: frozenset = frozenset()
    read_names: set = dataclasses.field(default_factory=set)


def check_tokenizer_fits(preprocessor, vocabulary_size, source):
    """A tokenizer of another model: ids past the embedding's rows would be
    clamped or give NaN, garbage without an error."""
    if preprocessor is None or preprocessor.tokenizer.proto is None:
        return
    pieces = preprocessor.tokenizer.vocabulary_size()
    if pieces > vocabulary_size:
        raise ValueError(
            f"{source}: the tokenizer has {pieces} pieces but the embedding only "
            f"{vocabulary_size} rows; the tokenizer belongs to another model."
        )


def build_causal_lm(checkpoint, dtype=None, load_weights=True, preprocessor="auto"):
    """A `GemmaCausalLM` with the checkpoint's weights (or, without
    `load_weights`, random ones) and tokenizer."""
    from keras_gemma.models.gemma_backbone import GemmaBackbone
    from keras_gemma.models.gemma_causal_lm import GemmaCausalLM

    if preprocessor == "auto":
        preprocessor = build_preprocessor(checkpoint)
    check_tokenizer_fits(preprocessor, checkpoint.backbone_kwargs["vocabulary_size"], checkpoint.source)
    from keras_gemma.models.deferred_variables import deferred_variables

    if not load_weights:
        backbone = GemmaBackbone(**checkpoint.backbone_kwargs, dtype=dtype)
        return GemmaCausalLM(backbone, preprocessor)
    _check_layer_count(checkpoint)
    # Build without initial values: every weight comes from the checkpoint.
    with deferred_variables():
        backbone = GemmaBackbone(**checkpoint.backbone_kwargs, dtype=dtype)
    hf.load_hf_weights(backbone, checkpoint.get_tensor, checkpoint.source)
    unread = sorted(checkpoint.stored_names - checkpoint.read_names)
    if unread:
        shown = ", ".join(map(repr, unread[:4])) + (", ..." if len(unread) > 4 else "")
        raise ValueError(
            f"{checkpoint.source} stores {len(unread)} tensor(s) that the model "
            f"its config describes does not use: {shown}. Is the config right "
            "for these weights? (Gemma has no output head of its own: it is the "
            "embedding.)"
        )
    return GemmaCausalLM(backbone, preprocessor)


def _check_layer_count(checkpoint):
    """A config with more layers than the file stores: refused before the
    model is built (a config of 2000 layers over 2 built for 22 s and ended
    in a RecursionError)."""
    layers = {
        int(match.group(1)) for name in checkpoint.stored_names
        if (match := re.search(r"(?:^|\.)(?:layers|blk)\.(\d+)\.", name))
    }
    expected = checkpoint.backbone_kwargs["num_layers"]
    if layers and max(layers) + 1 < expected:
        raise ValueError(
            f"{checkpoint.source}: its config describes {expected} layers, but the file "
            f"stores weights of {max(layers) + 1}: the file is incomplete, or the config "
            "belongs to a larger model."
        )


def build_preprocessor(checkpoint, **kwargs):
    """The checkpoint's tokenizer and preprocessor (no weights read);
    `kwargs` override the preprocessor's arguments (`sequence_length`...)."""
    from keras_gemma.models.gemma_causal_lm_preprocessor import (
        GemmaCausalLMPreprocessor,
    )
    from keras_gemma.models.gemma_tokenizer import GemmaTokenizer

    proto, stop_tokens = checkpoint.read_tokenizer()
    return GemmaCausalLMPreprocessor(
        GemmaTokenizer(proto=proto),
        **{"sequence_length": checkpoint.sequence_length, "stop_tokens": stop_tokens, **kwargs},
    )
