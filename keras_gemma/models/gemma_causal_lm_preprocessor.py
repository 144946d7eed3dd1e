import sys
import warnings

import keras
import numpy as np
import tensorflow as tf
from keras_hub.models import CausalLMPreprocessor

from keras_gemma.checkpoints import loading
from keras_gemma.checkpoints.loading import CatalogPresets
from keras_gemma.models.gemma_backbone import GemmaBackbone
from keras_gemma.models.gemma_tokenizer import GemmaTokenizer


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaCausalLMPreprocessor(CatalogPresets, CausalLMPreprocessor):
    """Turns strings into Gemma causal LM inputs and back.

    For training (`__call__`), each string becomes `<bos> tokens <eos>`,
    right-padded to `sequence_length`; labels are the inputs shifted by one
    and `sample_weight` is zero on padding. For generation
    (`generate_preprocess`), prompts get `<bos>` but no `<eos>`.

    Length policy (nothing is cut silently):
    - a generation prompt longer than the sequence length raises a
      `ValueError` that says how long it is and how to fix it;
    - a training example longer than `sequence_length` is truncated (the
      usual behaviour for training data) with a warning.

    Args:
        tokenizer: a `GemmaTokenizer`.
        sequence_length: padded length of training examples and the default
            generation length.
        stop_tokens: the pieces that end generation by default
            (`generate(stop_token_ids="auto")`). Base models stop on
            `<eos>`; instruction-tuned presets also set `<end_of_turn>`.
            This is configuration (saved with the preset), not a per-family
            rule in code.

    Example:
    ```python
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor(
        keras_gemma.GemmaTokenizer("vocabulary.spm"), sequence_length=128
    )
    x, y, sample_weight = preprocessor(["The quick brown fox"])
    ```
    """

    backbone_cls = GemmaBackbone
    tokenizer_cls = GemmaTokenizer

    def __init__(self, tokenizer, sequence_length=1024, stop_tokens=("<eos>",), **kwargs):
        super().__init__(tokenizer, sequence_length=sequence_length, **kwargs)
        self.stop_tokens = list(stop_tokens)

    @property
    def stop_token_ids(self):
        """Ids of `stop_tokens`; a piece the vocabulary lacks is an error."""
        ids = []
        for piece in self.stop_tokens:
            token_id = self.tokenizer.token_to_id(piece)
            if self.tokenizer.id_to_token(token_id) != piece:
                raise ValueError(
                    f"Stop token {piece!r} is not in the tokenizer's vocabulary; "
                    "fix `preprocessor.stop_tokens`."
                )
            ids.append(token_id)
        return ids

    def get_config(self):
        return {**super().get_config(), "stop_tokens": self.stop_tokens}

    @classmethod
    def from_preset(cls, preset, **kwargs):
        """Load the preprocessor of a preset (see `GemmaCausalLM.from_preset`)."""
        return loading.load_preprocessor(cls, preset, **kwargs)

    def call(self, x, y=None, sample_weight=None, sequence_length=None):
        sequence_length = sequence_length or self.sequence_length
        # Packed length: the tokens plus <bos>/<eos>; labels need one extra.
        overhead = int(self.add_start_token) + int(self.add_end_token)
        _check_lengths(
            self.tokenizer(x),
            limit=sequence_length + 1 - overhead,
            fail=False,
            message=(
                "A training example has more tokens than sequence_length="
                f"{sequence_length} allows; it is truncated. Raise "
                "`preprocessor.sequence_length` to keep whole examples."
            ),
        )
        return super().call(
            x, y=y, sample_weight=sample_weight, sequence_length=sequence_length
        )

    def generate_preprocess(self, x, sequence_length=None):
        sequence_length = sequence_length or self.sequence_length
        limit = sequence_length - int(self.add_start_token)
        _check_lengths(
            self.tokenizer(x),
            limit=limit,
            fail=True,
            message=(
                f"The prompt is longer than the sequence length: at most "
                f"{limit} tokens fit in max_length={sequence_length} (after "
                "<bos>). Pass a larger `max_length` to `generate()` or "
                "shorten the prompt."
            ),
        )
        return super().generate_preprocess(x, sequence_length=sequence_length)


def _check_lengths(token_ids, limit, fail, message):
    """Raise (`fail`) or warn when any row of `token_ids` exceeds `limit`.

    `token_ids` is what the tokenizer returns: a list of rows or a 1-D array
    eagerly, a (ragged) tensor inside a `tf.data` pipeline.
    """
    if isinstance(token_ids, (tf.Tensor, tf.RaggedTensor)) and not tf.executing_eagerly():
        if isinstance(token_ids, tf.RaggedTensor):
            longest = tf.reduce_max(token_ids.row_lengths())
        else:
            longest = tf.shape(token_ids)[-1]
        longest = tf.cast(longest, "int64")
        if fail:
            tf.debugging.assert_less_equal(longest, tf.constant(limit, "int64"), message)
        else:
            tf.cond(
                longest > limit,
                lambda: tf.print("WARNING:", message, output_stream=sys.stderr),
                lambda: tf.no_op(),
            )
        return
    if isinstance(token_ids, (tf.Tensor, tf.RaggedTensor)):
        token_ids = token_ids.to_list() if hasattr(token_ids, "to_list") else token_ids.numpy()
    if isinstance(token_ids, np.ndarray) and token_ids.ndim < 2:
        token_ids = [token_ids]
    longest = max((len(row) for row in token_ids), default=0)
    if longest > limit:
        if fail:
            raise ValueError(f"{message} (longest prompt: {longest} tokens)")
        warnings.warn(message, stacklevel=3)
