import numpy as np
import sentencepiece

import keras_gemma


def test_special_token_ids(tokenizer):
    assert tokenizer.pad_token_id == 0
    assert tokenizer.end_token_id == 1
    assert tokenizer.start_token_id == 2
    assert tokenizer.unk_token_id == 3
    assert tokenizer.id_to_token(tokenizer.start_of_turn_id) == "<start_of_turn>"
    assert tokenizer.id_to_token(tokenizer.end_of_turn_id) == "<end_of_turn>"


def test_tokenizes_like_sentencepiece(tokenizer, spm_proto):
    reference = sentencepiece.SentencePieceProcessor(model_proto=spm_proto)
    texts = ["The quick brown fox", "hello keras 123", "<start_of_turn>user\nhi"]
    for text, ids in zip(texts, tokenizer(texts)):
        assert list(np.asarray(ids)) == reference.encode(text)
    ids = tokenizer("hello keras")
    assert tokenizer.detokenize(ids) == "hello keras"


def test_chat_markers_are_single_tokens(tokenizer):
    ids = list(np.asarray(tokenizer("<start_of_turn>user\nhi<end_of_turn>")))
    assert ids[0] == tokenizer.start_of_turn_id
    assert ids[-1] == tokenizer.end_of_turn_id


def test_missing_turn_markers_give_none():
    import io

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(["plain words only here"] * 20), model_writer=model,
        vocab_size=30, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
        eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>", hard_vocab_limit=False,
        minloglevel=2,
    )
    tokenizer = keras_gemma.GemmaTokenizer(proto=model.getvalue())
    assert tokenizer.end_of_turn_id is None
    assert tokenizer.start_of_turn_id is None


def test_vocabulary_is_kept_out_of_keras_tracking(tokenizer, spm_proto):
    # Keras wrapped KerasHub's vocabulary list and piece -> id dict and
    # walked every piece: 1.3 s of each gemma3_270m load (262k pieces).
    assert type(tokenizer._vocabulary) is list
    assert type(tokenizer._token_to_id_map) is dict
    reference = sentencepiece.SentencePieceProcessor(model_proto=spm_proto)
    pieces = [reference.id_to_piece(i) for i in range(reference.vocab_size())]
    assert tokenizer.get_vocabulary() == pieces
    assert [tokenizer.token_to_id(piece) for piece in pieces] == list(range(len(pieces)))
    tokenizer.set_proto(None)  # KerasHub's reset still clears them.
    assert tokenizer._vocabulary is None and tokenizer._token_to_id_map is None
