"""The guides run end to end (they use the real default model)."""

import os
import subprocess
import sys

import keras
import pytest

GUIDES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "guides")


def run_guide(name, output_dir=None):
    """Run a guide on the current backend (fast mode when it writes to
    `output_dir`); returns its stdout after checking that it succeeded."""
    env = {**os.environ, "KERAS_BACKEND": keras.config.backend()}
    if output_dir is not None:
        env.update(KERAS_GEMMA_GUIDE_FAST="1", KERAS_GEMMA_GUIDE_OUTPUT=str(output_dir))
    done = subprocess.run(
        [sys.executable, os.path.join(GUIDES, name)],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def assert_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


@pytest.mark.real_model
def test_quickstart_guide_runs():
    stdout = run_guide("quickstart.py")
    assert "The capital of France is the capital of the country of France" in stdout


def test_backend_comparison_guide_runs_and_plots(tmp_path):
    stdout = run_guide("backend_comparison.py", tmp_path)
    assert "keras_gemma    | " + keras.config.backend() in stdout
    assert_png(tmp_path / "backend_comparison.png")


@pytest.mark.real_model
def test_lora_finetuning_guide_trains_saves_and_reloads(tmp_path):
    stdout = run_guide("lora_finetuning.py", tmp_path)
    assert "trained 2 steps" in stdout
    assert_png(tmp_path / "lora_loss.png")
    assert (tmp_path / "pirate.lora.safetensors").stat().st_size > 1_000_000
    # The adapters loaded into a fresh model give the trained model's logits
    # and answers exactly.
    assert "reloaded adapter: max |logit diff| = 0, same answers: True" in stdout
