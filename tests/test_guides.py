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
    # TensorFlow's XLA on, as users run them (conftest turns it off for the
    # tiny models; the quickstart took 303 s on TensorFlow without it, 235 s
    # with it while another suite shared the CPU).
    env = {**os.environ, "KERAS_BACKEND": keras.config.backend(), "KERAS_GEMMA_TF_XLA": "1"}
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
    assert "in the trained style:" in stdout  # Generated after training.
    # The adapters loaded into a fresh model give the trained model's logits
    # exactly (fast mode skips its generation: same logits, same answers).
    assert "reloaded adapter: max |logit diff| = 0\n" in stdout


def test_guides_import_only_what_the_guides_extra_installs():
    """`pip install 'keras-gemma[guides]'` (plus a backend) is enough to
    run every guide: each package a guide imports is a dependency."""
    import ast
    import configparser
    import importlib.metadata
    import re

    setup = configparser.ConfigParser()
    setup.read(os.path.join(os.path.dirname(GUIDES), "setup.cfg"))
    requirements = setup["options"]["install_requires"] + setup["options.extras_require"]["guides"]
    installed = {re.split(r"[<>=\[ ]", line.strip())[0].lower().replace("_", "-")
                 for line in requirements.splitlines() if line.strip()}
    distributions = importlib.metadata.packages_distributions()
    missing = set()
    for name in sorted(os.listdir(GUIDES)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(GUIDES, name)) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for module in (m.split(".")[0] for m in modules):
                if module in sys.stdlib_module_names or module == "keras_gemma":
                    continue
                packages = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
                if not packages & installed:
                    missing.add(f"{name}: {module}")
    assert not missing, missing
