import operator
import warnings

import keras
import numpy as np
from keras_hub.layers import MultiSegmentPacker
from keras_hub.models import CausalLMPreprocessor
from keras_hub.src.utils.tensor_utils import preprocessing_function

from keras_gemma.chat import format_chat
from keras_gemma.checkpoints import loading
from keras_gemma.checkpoints.loading import CatalogPresets
from keras_gemma.models.gemma_backbone import GemmaBackbone
from keras_gemma.models.gemma_tokenizer import START_OF_TURN, GemmaTokenizer
from keras_gemma.staging import staged_preset

try:
    import tensorflow as tf

    TF_TENSOR, TF_RAGGED_TENSOR = tf.Tensor, tf.RaggedTensor
    HAS_TENSORFLOW = True
except ImportError:  # A JAX- or PyTorch-only install: no string tensors, no tf.data.
    tf = None
    HAS_TENSORFLOW = False
    TF_TENSOR = TF_RAGGED_TENSOR = ()  # `isinstance(x, ())` is False.

INSTRUCTION_KEYS = ("prompts", "responses")


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaCausalLMPreprocessor(CatalogPresets, CausalLMPreprocessor):
    """Turns strings or prompt/response pairs into Gemma causal LM inputs and back.

    For training (`__call__`), each string becomes `<bos> tokens <eos>`,
    right-padded to `sequence_length`; labels are the inputs shifted by one
    and `sample_weight` is zero on padding. For generation
    (`generate_preprocess`), prompts get `<bos>` but no `<eos>`.

    Instruction data, `{"prompts": [...], "responses": [...]}` (one response
    per prompt), packs as `<bos> prompt response <eos>` and trains on the
    response only: `sample_weight` is 1 where the target token is part of the
    response (its final `<eos>` included) and 0 on the prompt and padding.

    With `apply_chat_template=True`, instruction data is put in Gemma's chat
    format (`keras_gemma.format_chat`): the prompt becomes
    `<start_of_turn>user\\n{prompt}<end_of_turn>\\n<start_of_turn>model\\n`
    and the response `{response}<end_of_turn>`, then `<eos>`. Generation
    prompts are wrapped the same way, so a model tuned this way is prompted
    in its training format. A prompt that already starts with
    `<start_of_turn>` (e.g. a multi-turn `format_chat(...)` conversation) is
    taken as formatted and left as it is. Plain training strings are never
    wrapped. Pair it with `stop_tokens=("<eos>", "<end_of_turn>")`.

    Length policy (nothing is cut silently):
    - a generation prompt that leaves no room in the sequence length for a
      new token raises a `ValueError` that says how long it is and how to
      fix it;
    - a training example longer than `sequence_length` is truncated (the
      usual behaviour for training data) with a warning. For instruction
      data the end of the response is cut (and the prompt's end as well if
      the prompt alone does not fit), and the `<eos>` after the cut gets no
      loss (the model is not taught to stop there).

    Args:
        tokenizer: a `GemmaTokenizer`.
        sequence_length: padded length of training examples and the default
            generation length.
        stop_tokens: the pieces that end generation by default
            (`generate(stop_token_ids="auto")`). Base models stop on
            `<eos>`; instruction-tuned presets also set `<end_of_turn>`.
            This is configuration (saved with the preset), not a per-family
            rule in code.
        apply_chat_template: whether instruction data and generation prompts
            are put in Gemma's chat format (see above).
        add_start_token, add_end_token: whether plain training strings get
            `<bos>` / `<eos>` (KerasHub's arguments). Generation prompts
            always start with `<bos>` and instruction data always has both
            (the response's `<eos>` teaches the model to stop), as in
            KerasHub.

    Example:
    ```python
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor(
        keras_gemma.GemmaTokenizer("vocabulary.spm"), sequence_length=128
    )
    x, y, sample_weight = preprocessor(["The quick brown fox"])

    # Instruction tuning: the loss covers the responses only.
    data = {
        "prompts": ["What is the capital of France?", "Name a color."],
        "responses": ["Paris.", "Blue."],
    }
    x, y, sample_weight = preprocessor(data)
    gemma_lm.fit(data, batch_size=2)
    ```
    """

    backbone_cls = GemmaBackbone
    tokenizer_cls = GemmaTokenizer

    def __init__(
        self,
        tokenizer,
        sequence_length=1024,
        stop_tokens=("<eos>",),
        apply_chat_template=False,
        **kwargs,
    ):
        super().__init__(tokenizer, sequence_length=sequence_length, **kwargs)
        self.stop_tokens = stop_tokens
        self.apply_chat_template = apply_chat_template
        self.instruction_packer = None

    @CausalLMPreprocessor.sequence_length.setter
    def sequence_length(self, value):
        value = positive_token_count(value, "sequence_length")
        CausalLMPreprocessor.sequence_length.fset(self, value)

    @property
    def stop_tokens(self):
        """The pieces that end generation by default (a list)."""
        return self._stop_tokens

    @stop_tokens.setter
    def stop_tokens(self, pieces):
        # One string is one piece, not its characters; None: no stop tokens.
        if pieces is None:
            pieces = []
        self._stop_tokens = [pieces] if isinstance(pieces, str) else list(pieces)

    @property
    def stop_token_ids(self):
        """Ids of `stop_tokens`; a piece the vocabulary lacks is an error."""
        ids = []
        for piece in self.stop_tokens:
            token_id = self.tokenizer.piece_id(piece)
            if token_id is None:
                raise ValueError(
                    f"Stop token {piece!r} is not in the tokenizer's vocabulary; "
                    "fix `preprocessor.stop_tokens`."
                )
            ids.append(token_id)
        return ids

    def get_config(self):
        return {
            **super().get_config(),
            "stop_tokens": self.stop_tokens,
            "apply_chat_template": self.apply_chat_template,
        }

    @classmethod
    def from_preset(cls, preset, **kwargs):
        """Load the preprocessor of a preset (see `GemmaCausalLM.from_preset`)."""
        return loading.load_preprocessor(cls, preset, **kwargs)

    def save_to_preset(self, preset_dir):
        """KerasHub's, staged (see `GemmaTokenizer.save_to_preset`)."""
        with staged_preset(preset_dir, writes_weights=False) as staging:
            super().save_to_preset(staging)

    def build(self, input_shape):
        super().build(input_shape)
        # Prompt is segment 0 (with <bos>), response segment 1 (with <eos>).
        # "waterfall" keeps the prompt whole and cuts the response's end.
        self.instruction_packer = MultiSegmentPacker(
            start_value=self.tokenizer.start_token_id,
            end_value=self.tokenizer.end_token_id,
            sep_value=[],
            pad_value=self.tokenizer.pad_token_id,
            sequence_length=self.sequence_length,
            truncate="waterfall",
        )

    def call(self, x, y=None, sample_weight=None, sequence_length=None):
        sequence_length = sequence_length or self.sequence_length
        if isinstance(x, dict):
            prompts, responses = instruction_columns(x)
            if self.apply_chat_template:
                prompts = _chat_prompts(prompts)
                responses = _format(responses, "", _CHAT_RESPONSE_SUFFIX)
            x = (prompts, responses)
            pack = self._pack_instructions_tf if self._use_tf_workflow() else self._pack_instructions
        else:
            pack = self._pack_texts_tf if self._use_tf_workflow() else self._pack_texts
        return pack(x, y=y, sample_weight=sample_weight, sequence_length=sequence_length)

    def _pack_texts(self, x, y=None, sample_weight=None, sequence_length=None):
        """Pack strings as KerasHub does, checking the lengths of the same
        tokens; `y` and `sample_weight` are ignored."""
        token_ids = self.tokenizer(x)
        # Packed length: the tokens plus <bos>/<eos>; labels need one extra.
        overhead = int(self.add_start_token) + int(self.add_end_token)
        lengths, limit = _row_lengths(token_ids), sequence_length + 1 - overhead
        _check_lengths(
            lengths,
            limit=limit,
            fail=False,
            message=(
                "A training example has more tokens than sequence_length="
                f"{sequence_length} allows; it is truncated (and not trained "
                "to end there: no loss on its <eos>). Raise "
                "`preprocessor.sequence_length` to keep whole examples."
            ),
        )
        token_ids, padding_mask = self.packer(
            token_ids,
            sequence_length=sequence_length + 1,
            add_start_value=self.add_start_token,
            add_end_value=self.add_end_token,
        )
        x = {"token_ids": token_ids[..., :-1], "padding_mask": padding_mask[..., :-1]}
        y, sample_weight = token_ids[..., 1:], padding_mask[..., 1:]
        if self.add_end_token:
            # A cut text's last label is the <eos> the packer put after the
            # cut: training on it would teach the model to stop mid-text.
            sample_weight = _last_label_unweighted(sample_weight, lengths > limit)
        return keras.utils.pack_x_y_sample_weight(x, y, sample_weight)

    _pack_texts_tf = preprocessing_function(_pack_texts)

    def _pack_instructions(self, x, y=None, sample_weight=None, sequence_length=None):
        """Pack `(prompts, responses)`; `y` and `sample_weight` are ignored,
        as for strings."""
        prompts, responses = self.tokenizer(x[0]), self.tokenizer(x[1])
        lengths = _row_lengths(prompts) + _row_lengths(responses)
        limit = sequence_length - 1  # + 1 for the labels, - <bos>, <eos>
        _check_lengths(
            lengths,
            limit=limit,
            fail=False,
            message=(
                "A prompt and its response have more tokens than "
                f"sequence_length={sequence_length} allows; the end of the "
                "response is cut (all of it if the prompt alone does not "
                "fit) and the cut example is not trained to end there (no "
                "loss on its <eos>). Raise `preprocessor.sequence_length` "
                "to keep whole examples."
            ),
        )
        # One extra token: the labels are the inputs shifted by one.
        token_ids, segment_ids = self.instruction_packer(
            (prompts, responses), sequence_length=sequence_length + 1
        )
        padding_mask = token_ids != self.tokenizer.pad_token_id
        x = {"token_ids": token_ids[..., :-1], "padding_mask": padding_mask[..., :-1]}
        # Train on the response tokens only (segment 1, its <eos> included).
        y, sample_weight = token_ids[..., 1:], segment_ids[..., 1:] == 1
        # A cut example's last label is the <eos> the packer put after the
        # cut: training on it would teach the model to stop mid-answer.
        sample_weight = _last_label_unweighted(sample_weight, lengths > limit)
        return keras.utils.pack_x_y_sample_weight(x, y, sample_weight)

    _pack_instructions_tf = preprocessing_function(_pack_instructions)

    def generate_preprocess(self, x, sequence_length=None):
        sequence_length = sequence_length or self.sequence_length
        if sequence_length < 2:  # (The message below said "at most -1 tokens".)
            raise ValueError(
                f"max_length={sequence_length} leaves no room: generation needs at least 2 "
                "positions (<bos> and one new token). Pass a larger `max_length`."
            )
        if self.apply_chat_template:
            x = _chat_prompts(x)
        pack = self._pack_prompts_tf if self._use_tf_workflow() else self._pack_prompts
        return pack(x, sequence_length=sequence_length)

    def prompt_token_count(self, prompt):
        """How many tokens `generate()` starts from for the string `prompt`:
        its own, `<bos>`, and the chat template's if applied."""
        return self.prompt_token_counts(prompt)[0]

    def prompt_token_counts(self, prompts):
        """`prompt_token_count` of each prompt of `prompts` (a string, a list
        or array of strings, or a string tensor), as a list of ints."""
        text = _chat_prompts(prompts) if self.apply_chat_template else prompts
        return [int(n) + 1 for n in np.asarray(_row_lengths(self.tokenizer(text))).reshape(-1)]

    def _pack_prompts(self, x, sequence_length):
        """`<bos>` and the prompt's tokens, padded; a prompt that leaves
        no room for a new token is an error (KerasHub's generate() returned
        it unchanged, silently)."""
        if not self.built:
            self.build(None)
        token_ids = self.tokenizer(x)
        # Prompts always start with <bos>, as KerasHub's do (Gemma degrades
        # without it); `add_start_token` is for training data.
        limit = sequence_length - 2
        _check_lengths(
            _row_lengths(token_ids),
            limit=limit,
            fail=True,
            message=(
                f"The prompt is too long for the sequence length: at most "
                f"{limit} tokens fit in max_length={sequence_length} (after "
                "<bos>, with room for one new token). Pass a larger "
                "`max_length` to `generate()` or shorten the prompt."
            ),
        )
        token_ids, padding_mask = self.packer(
            token_ids, sequence_length=sequence_length, add_end_value=False
        )
        return {"token_ids": token_ids, "padding_mask": padding_mask}

    _pack_prompts_tf = preprocessing_function(_pack_prompts)


def _chat_template_pieces():
    """Split `format_chat`'s text for one user/model exchange around the
    two messages, so that the template is written in one place only."""
    text = format_chat(
        [{"role": "user", "content": "\0"}, {"role": "model", "content": "\1"}],
        add_generation_prompt=False,
    )
    user_prefix, rest = text.split("\0")
    model_prefix, model_suffix = rest.split("\1")
    # The newline after the model's <end_of_turn> only separates turns; the
    # model's reply ends at <end_of_turn> (then <eos> in training data).
    return user_prefix, model_prefix, model_suffix.rstrip("\n")


# "<start_of_turn>user\n", "<end_of_turn>\n<start_of_turn>model\n", "<end_of_turn>"
_CHAT_PROMPT_PREFIX, _CHAT_PROMPT_SUFFIX, _CHAT_RESPONSE_SUFFIX = _chat_template_pieces()


def _chat_prompts(prompts):
    """Each prompt as a user turn plus the model's generation prompt (as
    `format_chat([{"role": "user", "content": prompt}])`), except prompts
    that already start with `<start_of_turn>`."""
    return _format(prompts, _CHAT_PROMPT_PREFIX, _CHAT_PROMPT_SUFFIX, keep_formatted=True)


# What Python's `str.strip()` (and so Jinja's `trim`) removes, in RE2 terms;
# `tf.strings.strip` removes ASCII whitespace only.
_WHITESPACE = r"[\s\x{0b}\x{1c}-\x{1f}\x{85}\p{Z}]"
_STRIP_PATTERN = f"^{_WHITESPACE}+|{_WHITESPACE}+$"


def _format(texts, prefix, suffix, keep_formatted=False):
    """`prefix + text.strip() + suffix` for each string of `texts` (Gemma's
    templates trim a turn's content, as `format_chat` does): a string, a
    list or NumPy array of strings, or a string tensor (also inside
    `tf.data`)."""
    if isinstance(texts, TF_TENSOR):
        stripped = tf.strings.regex_replace(texts, _STRIP_PATTERN, "")
        formatted = tf.strings.join([prefix, stripped, suffix])
        if keep_formatted:
            is_chat = tf.equal(tf.strings.substr(texts, 0, len(START_OF_TURN)), START_OF_TURN)
            formatted = tf.where(is_chat, texts, formatted)
        return formatted
    if isinstance(texts, np.ndarray):
        texts = texts.tolist()
    if isinstance(texts, bytes):
        texts = texts.decode("utf-8")
    if isinstance(texts, str):
        if keep_formatted and texts.startswith(START_OF_TURN):
            return texts
        return prefix + texts.strip() + suffix
    return [_format(text, prefix, suffix, keep_formatted) for text in texts]


def instruction_columns(x):
    """`(prompts, responses)` of instruction data, checked."""
    if sorted(x) != sorted(INSTRUCTION_KEYS):
        raise ValueError(
            "Instruction data must be a dict with exactly the keys "
            f"{list(INSTRUCTION_KEYS)} (one response per prompt); got keys "
            f"{list(x)}. Already tokenized inputs (token_ids, padding_mask) "
            "need a model without a preprocessor: pass `preprocessor=None` "
            "to GemmaCausalLM, or set `gemma_lm.preprocessor = None`."
        )
    prompts, responses = x["prompts"], x["responses"]
    check_strings(prompts, "Instruction data's `prompts`")
    check_strings(responses, "Instruction data's `responses`")
    num_prompts, num_responses = _num_examples(prompts), _num_examples(responses)
    message = (
        "Instruction data needs one response per prompt, but `prompts` has "
        f"{_describe(num_prompts)} and `responses` has {_describe(num_responses)}. "
        "Pass `prompts` and `responses` of the same length."
    )
    if isinstance(num_prompts, TF_TENSOR) or isinstance(num_responses, TF_TENSOR):
        tf.debugging.assert_equal(num_prompts, num_responses, message)
    elif num_prompts != num_responses:
        raise ValueError(message)
    elif num_prompts == 0:
        raise ValueError("Instruction data with no examples: `prompts` and `responses` are empty.")
    return prompts, responses


def check_strings(texts, name):
    """A clear error for a list or tuple holding anything but text (the
    tokenizer's error came from deep in tf.data); others pass as they are."""
    if isinstance(texts, (list, tuple)):
        for text in texts:
            if not isinstance(text, (str, bytes)):
                raise ValueError(f"{name} must be strings; got {type(text).__name__} {text!r:.60}.")


def _num_examples(texts):
    """Batch size of string inputs; `None` for a single (unbatched) string.
    A tensor when the batch size is only known when running (`tf.data`)."""
    if isinstance(texts, (str, bytes)):
        return None
    if isinstance(texts, TF_TENSOR):
        if texts.shape.rank == 0:
            return None
        return texts.shape[0] if texts.shape[0] is not None else tf.shape(texts)[0]
    if isinstance(texts, np.ndarray) and texts.ndim == 0:
        return None
    return len(texts)


def _describe(num_examples):
    if num_examples is None:
        return "a single (unbatched) string"
    if isinstance(num_examples, int):
        return f"{num_examples} example{'' if num_examples == 1 else 's'}"
    return "a batch of examples"


def _last_label_unweighted(sample_weight, rows):
    """`sample_weight` (boolean, `[..., length]`) with its last column
    False in `rows` (boolean, one per row)."""
    if isinstance(sample_weight, TF_TENSOR):
        rows = tf.reshape(rows, tf.shape(sample_weight)[:-1])
        last = tf.logical_and(sample_weight[..., -1], tf.logical_not(rows))
        return tf.concat([sample_weight[..., :-1], last[..., None]], axis=-1)
    sample_weight = np.array(sample_weight)
    sample_weight[..., -1] &= ~np.asarray(rows).reshape(sample_weight.shape[:-1])
    return sample_weight


def _row_lengths(token_ids):
    """Tokens per row of what the tokenizer returns: a list of rows or a 1-D
    array (one row) eagerly, a (ragged) tensor inside a `tf.data` pipeline."""
    if isinstance(token_ids, TF_RAGGED_TENSOR):
        return token_ids.row_lengths()
    if isinstance(token_ids, TF_TENSOR):
        shape = tf.shape(token_ids, out_type="int64")
        if token_ids.shape.rank == 1:
            return shape
        return tf.fill(shape[:1], shape[-1])
    if isinstance(token_ids, np.ndarray) and token_ids.ndim < 2:
        return np.array([len(token_ids)])
    return np.array([len(row) for row in token_ids], dtype="int64")


def _check_lengths(lengths, limit, fail, message):
    """Raise (`fail`) or warn when any of the row `lengths` exceeds `limit`."""
    if isinstance(lengths, TF_TENSOR) and not tf.executing_eagerly():
        longest = tf.reduce_max(lengths)
        if fail:
            tf.debugging.assert_less_equal(longest, tf.constant(limit, "int64"), message)
        else:
            # A Python warning, shown once like the eager one's (tf.print
            # repeated it for every batch of every epoch).
            def warn():
                warnings.warn(message, UserWarning)
                return True

            tf.cond(
                longest > limit,
                lambda: tf.py_function(warn, [], Tout=tf.bool),
                lambda: tf.constant(False),
            )
        return
    longest = int(np.max(np.asarray(lengths), initial=0))
    if longest > limit:
        if fail:
            raise ValueError(f"{message} (longest prompt: {longest} tokens)")
        warnings.warn(message, stacklevel=3)


def checked_max_new_tokens(max_new_tokens, max_length):
    """`max_new_tokens` as an int (or None), given without `max_length`."""
    if max_new_tokens is None:
        return None
    if max_length is not None:
        raise ValueError(
            "Pass max_length (each prompt and its new tokens together) or "
            "max_new_tokens (new tokens per prompt), not both."
        )
    return positive_token_count(max_new_tokens, "max_new_tokens")


def positive_token_count(value, name):
    """`value` as an int, or a clear error unless it is a whole number >= 1."""
    try:
        number = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        number = None
    if number is None or number < 1:
        raise ValueError(f"{name} must be a positive whole number of tokens, got {value!r}.")
    return number
