"""The memory benchmark scripts' reporting (their runs load gemma3_270m:
minutes, not for the suite)."""

import importlib.util
import os


def load_script(name):
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lora_memory_table_names_every_failed_configuration():
    """A failure with an empty message (MemoryError()) was a blank line."""
    failed = [
        {"backend": "jax", "config": "float32", "error": {"stage": "load", "type": "MemoryError", "message": ""}},
        {"backend": "torch", "config": "int8", "error": {"stage": "load", "type": "ValueError", "message": "boom\nmore"}},
    ]
    lines = load_script("lora_memory").format_table(failed).splitlines()[2:]
    assert [line.split() for line in lines] == [
        ["jax", "float32", "FAILED", "at", "load:", "MemoryError:"],
        ["torch", "int8", "FAILED", "at", "load:", "ValueError:", "boom"],
    ]
