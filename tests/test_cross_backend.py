"""The same weights give the same greedy tokens on JAX, TensorFlow and PyTorch."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_gemma
from tests import helpers
from tests.test_presets import randomize_weights

# One process per backend generates for every preset given (a process'
# start, imports included, costs more than a tiny model's generation).
GENERATE = """
import json, sys
import numpy as np
import keras_gemma
inputs = {k: np.array(v, "int32") for k, v in json.loads(sys.argv[1]).items()}
results = []
for path in sys.argv[2:]:
    gemma_lm = keras_gemma.GemmaCausalLM.from_preset(path)
    gemma_lm.preprocessor = None  # Generate from token ids.
    out = gemma_lm.generate(inputs, stop_token_ids=None)
    results.append(np.asarray(out["token_ids"]).tolist())
print(json.dumps(results))
"""


# Gemma 3's features: sliding layers (a window shorter than the generated
# length: the ring buffer wraps), query/key norms, two RoPE bases, scaling.
GEMMA3_LIKE = dict(
    helpers.TINY_MQA, num_layers=3, sliding_window=4, layer_types=["sliding", "global", "sliding"],
    use_query_key_norm=True, use_sandwich_norms=True, query_scale=20,
    rope_max_wavelength=1e6, local_rope_max_wavelength=1e4, rope_scaling_factor=8.0,
)


@pytest.mark.skipif(
    keras.config.backend() != "jax",
    reason="runs every backend itself (in subprocesses): once per `make test`, in the JAX run",
)
def test_greedy_generation_is_identical_on_all_backends(tokenizer, vocabulary_size, tmp_path):
    """A Gemma 1 (MHA) and a Gemma 3 like model."""
    presets = []
    for name, config in [("gemma1", helpers.TINY_MHA), ("gemma3", GEMMA3_LIKE)]:
        backbone = keras_gemma.GemmaBackbone(vocabulary_size=vocabulary_size, **config)
        randomize_weights(backbone, seed=3)
        preprocessor = keras_gemma.GemmaCausalLMPreprocessor(tokenizer, sequence_length=16)
        presets.append(str(tmp_path / name))
        keras_gemma.GemmaCausalLM(backbone, preprocessor).save_to_preset(presets[-1])
    inputs = {
        "token_ids": [[2, 17, 40, 99, 0, 0, 0, 0, 0, 0, 0, 0], [2, 250, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]],
        "padding_mask": [[1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]],
    }
    results = {}
    for backend in ("jax", "tensorflow", "torch"):
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
        done = subprocess.run(
            [sys.executable, "-c", GENERATE, json.dumps(inputs), *presets],
            env=env, capture_output=True, text=True, timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        results[backend] = np.array(json.loads(done.stdout.strip().splitlines()[-1]))
    assert results["jax"].shape == (2, 2, 12)  # (preset, batch, length)
    assert (results["jax"][:, :, 4:] != 0).any(axis=(1, 2)).all()  # Each generated.
    np.testing.assert_array_equal(results["tensorflow"], results["jax"])
    np.testing.assert_array_equal(results["torch"], results["jax"])
