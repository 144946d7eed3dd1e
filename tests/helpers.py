"""Shared test fixtures: a tiny SentencePiece vocabulary, tiny configs and
random Hugging Face reference models with the same weights as ours."""

import io

import numpy as np
import pytest

from keras_gemma.devices import computes_on_gpu

TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Gemma is a family of lightweight open models from Google.",
    "Keras runs the same model on JAX, TensorFlow and PyTorch.",
    "def add(a, b):\n    return a + b",
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Fine-tuning with LoRA trains a few small matrices.",
    "hello world, hello gemma, hello keras",
    "1 2 3 4 5 6 7 8 9 10",
]

# Tiny configs: multi-query attention, and multi-head attention where
# heads * head_dim (64) != hidden_dim (48), as in Gemma 7B.
TINY_MQA = dict(
    num_layers=2, num_query_heads=4, num_key_value_heads=1,
    hidden_dim=32, intermediate_dim=64, head_dim=16,
)
TINY_MHA = dict(
    num_layers=2, num_query_heads=4, num_key_value_heads=4,
    hidden_dim=48, intermediate_dim=96, head_dim=16,
)


# Tests of how XLA compiles for a CPU (the products of one row): a GPU
# compiles them otherwise, and measured (benchmarks/gpu/profile_decode.py).
xla_cpu_compilation = pytest.mark.skipif(computes_on_gpu(), reason="XLA's CPU compilation")


CHAT_MARKERS = ("<mask>", "<start_of_turn>", "<end_of_turn>")


def train_sentencepiece(vocab_size=400, extra_symbols=(), model_type="unigram", markers=CHAT_MARKERS):
    """A tiny Gemma-like SentencePiece model: pad 0, eos 1, bos 2, unk 3,
    then `markers` (<mask> and the chat turn markers) and `extra_symbols`
    (e.g. Gemma 3's image tokens) as user-defined pieces.
    Gemma's own is a BPE model (`model_type="bpe"`)."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_TEXT * 10),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=[*markers, *extra_symbols],
        byte_fallback=True,
        # Gemma's normalizer settings.
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_digits=True,
        normalization_rule_name="identity",
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return model.getvalue()


def hf_config(vocabulary_size, family="gemma", **kwargs):
    """A transformers config with eager attention for a tiny keras_gemma config."""
    import transformers

    config = dict(
        vocab_size=vocabulary_size,
        num_hidden_layers=kwargs["num_layers"],
        num_attention_heads=kwargs["num_query_heads"],
        num_key_value_heads=kwargs["num_key_value_heads"],
        hidden_size=kwargs["hidden_dim"],
        intermediate_size=kwargs["intermediate_dim"],
        head_dim=kwargs["head_dim"],
        hidden_act="gelu_pytorch_tanh",
        hidden_activation="gelu_pytorch_tanh",
        attn_implementation="eager",
    )
    config_class = {
        "gemma": transformers.GemmaConfig,
        "gemma2": transformers.Gemma2Config,
        "gemma3_text": transformers.Gemma3TextConfig,
    }[family]
    return config_class(**config, **kwargs.get("hf_extra", {}))


def randomize_(torch_model, seed=0):
    """Random weights large enough that logits are well separated (the
    default init is so small that every logit is near zero); norm weights
    random too, so that the (1 + w) convention is exercised."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in torch_model.named_parameters():
            if param.ndim == 1:
                std = 0.3
            else:
                std = param.shape[-1] ** -0.5 * (1.0 if "embed" in name else 1.5)
            param.copy_(torch.randn(param.shape, generator=generator) * std)
    return torch_model


def hf_reference_and_ours(vocabulary_size, config, seed=0, family="gemma"):
    """A random transformers causal LM and a keras_gemma one with its weights."""
    import transformers

    import keras_gemma
    from keras_gemma.checkpoints import hf

    hf_model = transformers.AutoModelForCausalLM.from_config(
        hf_config(vocabulary_size, family, **config), attn_implementation="eager"
    )
    randomize_(hf_model, seed).eval()
    kwargs = hf.backbone_kwargs_from_hf_config(hf_model.config.to_dict())
    backbone = keras_gemma.GemmaBackbone(**kwargs)
    state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    hf.load_hf_weights(backbone, state.__getitem__, source="test state dict")
    return hf_model, keras_gemma.GemmaCausalLM(backbone)


def hf_logits(hf_model, token_ids, padding_mask=None):
    import torch

    with torch.no_grad():
        out = hf_model(
            input_ids=torch.as_tensor(np.asarray(token_ids)),
            attention_mask=None if padding_mask is None else torch.as_tensor(np.asarray(padding_mask)),
        )
    return out.logits.numpy()


def random_token_ids(vocabulary_size, shape, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, vocabulary_size, size=shape).astype("int32")
    ids[:, 0] = 2  # <bos>
    return ids


def gradients(loss_fn, variables):
    """The gradient of the scalar `loss_fn()` with respect to the Keras
    `variables`, on the current backend, as NumPy arrays."""
    import keras

    backend = keras.config.backend()
    if backend == "jax":
        import jax

        def loss_of(values):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                return loss_fn()

        grads = jax.grad(loss_of)([v.value for v in variables])
    elif backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = loss_fn()
        grads = tape.gradient(loss, [v.value for v in variables])
    else:
        import torch

        grads = torch.autograd.grad(loss_fn(), [v.value for v in variables])
    return [keras.ops.convert_to_numpy(g) for g in grads]


def record_block_calls(monkeypatch):
    """A list that gets the name of each decoder block whose `call` runs
    (eagerly or while being traced), in order."""
    import functools

    from keras_gemma.layers.decoder_block import GemmaDecoderBlock

    calls = []
    original = GemmaDecoderBlock.call

    @functools.wraps(original)  # Keras reads `call`'s signature.
    def recorded(self, *args, **kwargs):
        calls.append(self.name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GemmaDecoderBlock, "call", recorded)
    return calls
