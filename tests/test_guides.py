"""The guides run end to end (they use the real default model)."""

import os
import subprocess
import sys

import keras
import pytest

GUIDES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "guides")


@pytest.mark.real_model
def test_quickstart_guide_runs():
    env = {**os.environ, "KERAS_BACKEND": keras.config.backend()}
    done = subprocess.run(
        [sys.executable, os.path.join(GUIDES, "quickstart.py")],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "The capital of France is the capital of the country of France" in done.stdout


def test_backend_comparison_guide_runs_and_plots(tmp_path):
    env = {
        **os.environ, "KERAS_BACKEND": keras.config.backend(),
        "KERAS_GEMMA_GUIDE_FAST": "1", "KERAS_GEMMA_GUIDE_OUTPUT": str(tmp_path),
    }
    done = subprocess.run(
        [sys.executable, os.path.join(GUIDES, "backend_comparison.py")],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "keras_gemma    | " + keras.config.backend() in done.stdout
    plot = tmp_path / "backend_comparison.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000


@pytest.mark.real_model
def test_lora_finetuning_guide_trains_saves_and_reloads(tmp_path):
    env = {
        **os.environ, "KERAS_BACKEND": keras.config.backend(),
        "KERAS_GEMMA_GUIDE_FAST": "1", "KERAS_GEMMA_GUIDE_OUTPUT": str(tmp_path),
    }
    done = subprocess.run(
        [sys.executable, os.path.join(GUIDES, "lora_finetuning.py")],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trained 2 steps" in done.stdout
    plot = tmp_path / "lora_loss.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    assert (tmp_path / "pirate.lora.safetensors").stat().st_size > 1_000_000
    # The adapters loaded into a fresh model give the trained model's logits
    # and answers exactly.
    assert "reloaded adapter: max |logit diff| = 0, same answers: True" in done.stdout
