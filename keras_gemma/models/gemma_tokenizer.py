import keras
from keras_hub.tokenizers import SentencePieceTokenizer

from keras_gemma.checkpoints import loading
from keras_gemma.checkpoints.loading import CatalogPresets
from keras_gemma.staging import staged_preset

# The chat turn markers: their ids differ between families, looked up by piece.
START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"


def _tf_errors():
    """tf_text's error class, when TensorFlow is installed (JAX and PyTorch
    need none: KerasHub then tokenizes with the sentencepiece package)."""
    try:
        import tensorflow as tf
    except ImportError:
        return ()
    return (tf.errors.OpError,)


def _tensorflow_seed_generator():
    """The generator TensorFlow made at the last `tf.random.set_seed`."""
    from tensorflow.python.eager import context

    return getattr(context.context(), "_rng", None)


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaTokenizer(CatalogPresets, SentencePieceTokenizer):
    """Gemma's SentencePiece tokenizer.

    Special tokens: `<pad>`, `<eos>`, `<bos>`, `<unk>` and the chat turn
    markers `<start_of_turn>` / `<end_of_turn>` (their ids are
    `start_of_turn_id` / `end_of_turn_id`, `None` when the vocabulary lacks
    them).

    Args:
        proto: a path to a SentencePiece `.spm`/`.model` file or its bytes.

    Example:
    ```python
    tokenizer = keras_gemma.GemmaTokenizer(proto="vocabulary.spm")
    tokenizer("The quick brown fox")
    ```
    """

    def __init__(self, proto, **kwargs):
        self._add_special_token("<bos>", "start_token")
        self._add_special_token("<eos>", "end_token")
        self._add_special_token("<pad>", "pad_token")
        super().__init__(proto=proto, **kwargs)

    # KerasHub keeps the vocabulary as a list and a dict on the layer, and
    # Keras' attribute tracking wraps them and walks every piece (262k for
    # Gemma 3: 1.3 s of each load). Strings hold no weights to track.
    _UNTRACKED = frozenset({"_vocabulary", "_token_to_id_map"})

    def __setattr__(self, name, value):
        if name in self._UNTRACKED:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def _set_proto_tf(self, proto):
        super()._set_proto_tf(proto)
        object.__setattr__(self, "_made_under_seed", _tensorflow_seed_generator())

    def _maybe_initialized_tf(self):
        """`tf.random.set_seed` (`keras.utils.set_random_seed` calls it)
        clears TensorFlow's kernel caches, and tf_text's SentencePiece
        resource with them: tokenizing after a seed was set (e.g. before
        `fit()`) failed with "Resource .../SentencepieceOp... does not
        exist" (KerasHub's tokenizer too). TensorFlow makes a new generator
        at each seed: one newer than the resource remakes it."""
        import tensorflow as tf

        made_under = getattr(self, "_made_under_seed", None)
        if getattr(self, "_sentence_piece", None) is not None and made_under is not _tensorflow_seed_generator():
            # Eagerly: made while tf.data traces, the resource would belong
            # to that graph, and the next pipeline's trace could not use it.
            with tf.init_scope():
                self._set_proto_tf(self.proto)
        super()._maybe_initialized_tf()

    def set_proto(self, proto):
        try:
            super().set_proto(proto)
        except (*_tf_errors(), RuntimeError) as e:
            # tf_text's and sentencepiece's errors name no file.
            where = f" {proto}" if isinstance(proto, str) and len(proto) <= 2048 else ""
            raise ValueError(
                f"The SentencePiece model{where} cannot be read: it is not a "
                "SentencePiece model, or it is truncated or corrupt "
                f"({str(e).splitlines()[0][:200]})."
            ) from None

    @classmethod
    def from_preset(cls, preset, **kwargs):
        """Load the tokenizer of a preset (see `GemmaCausalLM.from_preset`)."""
        return loading.load_tokenizer(cls, preset, **kwargs)

    def save_to_preset(self, preset_dir):
        """KerasHub's, staged: an interrupted save (a full disk) left a
        truncated vocabulary in a preset that then failed to load."""
        with staged_preset(preset_dir, writes_weights=False) as staging:
            super().save_to_preset(staging)

    def piece_id(self, piece):
        """The id of `piece`, or None if the vocabulary lacks it (or none is
        loaded). `token_to_id` gives <unk>'s id for an unknown piece."""
        if self.proto is None:
            return None
        token_id = self.token_to_id(piece)
        return token_id if self.id_to_token(token_id) == piece else None

    @property
    def unk_token_id(self):
        return self.piece_id("<unk>")

    @property
    def start_of_turn_id(self):
        return self.piece_id(START_OF_TURN)

    @property
    def end_of_turn_id(self):
        return self.piece_id(END_OF_TURN)
