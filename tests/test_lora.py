import keras
import numpy as np

import keras_gemma
from tests import helpers
from tests.test_presets import logits, randomize_weights

TEXTS = ["The capital of France is Paris.", "hello world, hello gemma"] * 4


def test_lora_fit_reduces_loss_and_adapters_round_trip(spm_proto, vocabulary_size, tmp_path):
    # Seeds the adapters' initial values. Before the tokenizer: on TensorFlow
    # it resets the context, which drops existing SentencePiece resources.
    keras.utils.set_random_seed(0)
    tokenizer = keras_gemma.GemmaTokenizer(proto=spm_proto)
    backbone = keras_gemma.GemmaBackbone(vocabulary_size=vocabulary_size, **helpers.TINY_MQA)
    randomize_weights(backbone)
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor(tokenizer, sequence_length=24)
    gemma_lm = keras_gemma.GemmaCausalLM(backbone, preprocessor)
    gemma_lm.save_to_preset(str(tmp_path / "base"))

    backbone.enable_lora(rank=4)
    # Only the adapters train. EinsumDense LoRA on a [heads, D, H] kernel
    # adds A [heads, D, rank] and B [rank, H], on queries and values.
    N, K, D, H, L, rank = 4, 1, 32, 16, 2, 4
    expected = L * rank * ((N * D + H) + (K * D + H))
    assert sum(int(np.prod(w.shape)) for w in backbone.trainable_weights) == expected

    gemma_lm.compile(optimizer=keras.optimizers.Adam(5e-2))
    history = gemma_lm.fit(TEXTS, batch_size=4, epochs=20, verbose=0)
    losses = history.history["loss"]
    print("LoRA losses per epoch:", [round(x, 3) for x in losses])
    # Frozen random weights make a q/v-only adapter learn slowly: about
    # 4.8 -> 4.0 nats over 20 epochs here.
    assert losses[-1] < losses[0] - 0.5, losses
    assert min(losses[-5:]) < min(losses[:5]) - 0.3, losses

    adapters = str(tmp_path / "adapters.lora.h5")
    backbone.save_lora_weights(adapters)
    restored = keras_gemma.GemmaCausalLM.from_preset(str(tmp_path / "base"))
    assert not np.allclose(logits(restored), logits(gemma_lm), atol=1e-3)
    restored.backbone.load_lora_weights(adapters)
    np.testing.assert_array_equal(logits(restored), logits(gemma_lm))
