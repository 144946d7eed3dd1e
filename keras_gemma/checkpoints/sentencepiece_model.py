"""Gemma's SentencePiece model, rebuilt where a checkpoint stores its
tokenizer in another form: a GGUF vocabulary, or the `tokenizer.json` of
Hugging Face `tokenizers` (transformers 5 saves only that one), and the
tokens a fine-tune added to it.

Gemma's tokenizer is a byte-fallback BPE model over raw text: spaces become
"▁", no space is prepended, nothing else is normalized.
"""

import re

from sentencepiece import sentencepiece_model_pb2

Piece = sentencepiece_model_pb2.ModelProto.SentencePiece
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


def gemma_model_proto(pieces, source):
    """Serialized SentencePiece BPE model of `pieces`, `(piece, score, type
    name)` in id order (type names of `ModelProto.SentencePiece.Type`)."""
    model = sentencepiece_model_pb2.ModelProto()
    for text, score, type_name in pieces:
        piece = model.pieces.add()
        piece.piece, piece.score, piece.type = text, float(score), Piece.Type.Value(type_name)
    texts = [piece.piece for piece in model.pieces]
    missing = [f"<{name}>" for name in ("pad", "eos", "bos", "unk") if f"<{name}>" not in texts]
    if missing:
        raise ValueError(f"{source}: the vocabulary lacks {', '.join(missing)}; it is not a Gemma tokenizer.")
    spec = model.trainer_spec
    spec.model_type = sentencepiece_model_pb2.TrainerSpec.BPE
    spec.vocab_size = len(texts)
    # SentencePiece refuses byte fallback without all 256 byte pieces.
    spec.byte_fallback = sum(piece.type == Piece.BYTE for piece in model.pieces) == 256
    for name in ("pad", "eos", "bos", "unk"):
        setattr(spec, f"{name}_id", texts.index(f"<{name}>"))
        setattr(spec, f"{name}_piece", f"<{name}>")
    normalizer = model.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = False  # Gemma does not prepend a space.
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    return model.SerializeToString()


def from_tokenizer_json(data, source):
    """The SentencePiece model of a Gemma `tokenizer.json` (parsed).

    `tokenizers` stores the BPE model as a vocabulary and a ranked list of
    merges; SentencePiece merges the pair whose joined piece scores highest.
    So a piece's score is minus the rank of the first merge that makes it.
    Added tokens that are special are control pieces (never matched in
    text, as in Gemma's own model); the others, and tokens a fine-tune
    added beyond the BPE vocabulary, are user-defined (matched in text).
    """
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise ValueError(
            f"{source} holds a {model.get('type')} tokenizer"
            f"{'' if model.get('byte_fallback') else ' without byte fallback'}; "
            "Gemma's is a byte-fallback BPE tokenizer."
        )
    _check_gemma_text_handling(data, source)
    vocab = model["vocab"]
    added = {token["id"]: token for token in data.get("added_tokens") or []}
    pieces = {i: text for text, i in vocab.items()}
    pieces.update({i: token["content"] for i, token in added.items() if i not in pieces})
    if sorted(pieces) != list(range(len(pieces))):
        raise ValueError(f"{source}: the token ids are not 0..{len(pieces) - 1}; the file is damaged.")
    first_rank = {}
    for rank, merge in enumerate(model.get("merges") or []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        first_rank.setdefault(left + right, rank)
    unk = model.get("unk_token")
    in_vocab = set(vocab.values())

    def piece(i):
        text = pieces[i]
        if text == unk:
            return text, 0.0, "UNKNOWN"
        if is_gemma_user_defined(text):
            return text, 0.0, "USER_DEFINED"
        if i in added:
            special = added[i].get("special") and i in in_vocab
            return text, 0.0, "CONTROL" if special else "USER_DEFINED"
        if _BYTE_PIECE.fullmatch(text):
            return text, 0.0, "BYTE"
        return text, -float(first_rank.get(text, 0)), "NORMAL"

    return gemma_model_proto([piece(i) for i in range(len(pieces))], source)


def is_gemma_user_defined(text):
    """Pieces Gemma's model matches whole in raw text, whatever a converted
    file says: the chat markers (so chat markup tokenizes; transformers'
    GGUF conversion calls them special) and runs of spaces."""
    return text in ("<start_of_turn>", "<end_of_turn>") or (len(text) > 1 and not text.strip("\u2581"))


def _check_gemma_text_handling(data, source):
    """Refuse a tokenizer.json that normalizes or splits text otherwise than
    Gemma's (the rebuilt model would tokenize differently)."""
    normalizer, pre_tokenizer = data.get("normalizer"), data.get("pre_tokenizer")
    space_to_meta = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
    # transformers 5 writes this split on spaces; after the normalizer there are none.
    no_op_split = {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": False}
    if normalizer != space_to_meta or pre_tokenizer not in (None, no_op_split):
        raise ValueError(
            f"{source}: its normalizer {normalizer} or pre-tokenizer {pre_tokenizer} "
            "is not Gemma's (spaces to \u2581, nothing else): keras_gemma would "
            "tokenize differently. Add the model's tokenizer.model beside it."
        )


def with_added_tokens(proto, data, source):
    """`proto` extended by the tokens of a `tokenizer.json` (parsed) whose
    ids follow its last piece: what a fine-tune added (chat markers...)."""
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(proto)
    size = len(model.pieces)
    extra = sorted(
        (token for token in data.get("added_tokens") or [] if token["id"] >= size),
        key=lambda token: token["id"],
    )
    if not extra:
        return proto
    ids = [token["id"] for token in extra]
    if ids != list(range(size, size + len(extra))):
        raise ValueError(
            f"{source} adds tokens with ids {ids}, which do not follow the "
            f"{size} pieces of tokenizer.model; the files do not belong together."
        )
    for token in extra:
        piece = model.pieces.add()
        piece.piece, piece.score, piece.type = token["content"], 0.0, Piece.USER_DEFINED
    model.trainer_spec.vocab_size = len(model.pieces)
    return model.SerializeToString()
