"""The benchmark harness (`keras-gemma bench`): its workers, its table and
its failures. Its workers generate and train uncompiled on PyTorch and
without XLA on TensorFlow (tests/conftest.py): what is checked is the
harness, not the speed; the training check compiles, as it reports
PyTorch's compile phases."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import types

import keras
import numpy as np
import pytest

from keras_gemma import bench


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    """`weights_dir(config)`: where that config's random weights are
    written by the first run on it and reused by the next (each setup
    worker takes ~10 s)."""
    root = tmp_path_factory.mktemp("bench_weights")
    return lambda config: str(root / config)

# Gemma 3 also runs KerasHub's Gemma3CausalLM (its generate() failed
# without a preprocessor, and the whole table was lost).
@pytest.mark.parametrize(
    "interleave, config", [(False, "tiny_gemma3"), (True, "tiny")],
    ids=["one_after_another", "interleaved"],
)
def test_bench_runs_every_implementation_and_prints_one_table(interleave, config, weights_dir):
    backend = keras.config.backend()
    messages = []
    header, rows = bench.run_benchmark(
        # Enough new tokens that the full call measurably outlasts a 1-token one.
        config=config, backends=(backend,), compare=("keras_hub",), weights_dir=weights_dir(config),
        prompt_length=4, new_tokens=24, repeats=2, log=messages.append,
        interleave=interleave,
    )
    assert [(r["implementation"], r["backend"]) for r in rows] == [
        ("keras_gemma", backend), ("keras_hub", backend)
    ]
    # Each implementation's numbers are logged when it finishes (a run
    # stopped by a time limit keeps them).
    logged = [json.loads(m[len("result "):]) for m in messages if m.startswith("result ")]
    # Decode speed is None where the timed calls could not separate decoding
    # from prefill (a loaded machine: seen with three suites on 2 cores).
    assert [(r["implementation"], r["decode_tokens_per_s"]) for r in logged] == [
        (r["implementation"], None if r["decode_tokens_per_s"] is None else pytest.approx(r["decode_tokens_per_s"], rel=1e-3))
        for r in rows
    ]
    # Interleaved, the implementations take turns call by call; else one
    # finishes its calls before the next starts.
    ours, theirs = ([call["start"] for call in row["timed_calls"]] for row in rows)
    assert len(ours) == len(theirs) == 2
    if interleave:
        assert ours[0] < theirs[0] < ours[1] < theirs[1]
        assert "taking turns" in bench.format_table(header, rows)
    else:
        assert ours[1] < theirs[0]
    for row in rows:
        assert row["prefill_tokens_per_s"] > 0
        assert row["first_call_s"] > 0 and row["peak_mb"] > 10
        assert row["decode_tokens_per_s"] is None or row["decode_tokens_per_s"] > 0
    if None not in (rows[0]["decode_tokens_per_s"], rows[1]["decode_tokens_per_s"]):
        assert rows[0]["vs_keras_hub"] == pytest.approx(
            rows[0]["decode_tokens_per_s"] / rows[1]["decode_tokens_per_s"]
        )
    table = bench.format_table(header, rows)
    assert "keras_gemma" in table and "keras_hub" in table and header["date"] in table


@pytest.mark.usefixtures("compiled_paths")
def test_bench_train_mode_times_lora_steps_next_to_keras_hub(weights_dir):
    backend = keras.config.backend()
    messages = []
    header, rows = bench.run_benchmark(
        config="tiny", backends=(backend,), compare=("keras_hub", "transformers"),
        weights_dir=weights_dir("tiny"),
        mode="train", batch_size=2, sequence_length=8, steps=2, log=messages.append, loss_fraction=0.5,
    )
    assert "not compared: transformers (no LoRA training here)" in messages
    assert [(r["implementation"], r["backend"]) for r in rows] == [
        ("keras_gemma", backend), ("keras_hub", backend)
    ]
    for row in rows:
        assert row["step_s"] > 0 and row["train_tokens_per_s"] == pytest.approx(16 / row["step_s"])
        assert row["loss_tokens"] == 8  # Half of each row's 8 tokens: loss_fraction reached the worker.
        # The steps' own high-water mark: after loading and compiling, so
        # no higher than the process' peak.
        assert 10 < row["step_peak_mb"] <= row["peak_mb"]
    assert rows[0]["trainable_params"] == rows[1]["trainable_params"] > 0
    assert rows[0]["vs_keras_hub"] == pytest.approx(rows[1]["step_s"] / rows[0]["step_s"])
    table = bench.format_table(header, rows)
    assert "step peak MB" in table and "the loss on the last 50% of each sequence's tokens" in table
    # Where a PyTorch first step spent its time (the GPU check's slow compiles).
    if backend == "torch":
        phases = rows[0]["compile_phases_s"]
        assert 0 < phases["entire_frame_compile"] <= rows[0]["first_call_s"]
        assert rows[0]["torch_block_regions"] is True  # PyTorch 2.13 (the pinned one).
    else:
        assert "compile_phases_s" not in rows[0]


def test_bench_loss_fraction_weights_the_last_tokens_of_each_row():
    """`--loss-fraction`: instruction-shaped data, the loss on each row's
    last tokens (a response) only; at least one token keeps a weight."""
    np.testing.assert_array_equal(bench.loss_weights(2, 8, 0.25), [[0] * 6 + [1] * 2] * 2)
    np.testing.assert_array_equal(bench.loss_weights(1, 4, 1.0), [[1] * 4])
    np.testing.assert_array_equal(bench.loss_weights(1, 4, 0.01), [[0, 0, 0, 1]])


def test_bench_weights_dir_writes_the_weights_once_and_reuses_them(tmp_path):
    """Several runs on a big configuration (the GPU check) write its weights
    once, the first from the command with no --backends (it failed: "No
    --backends given"); a directory holding something else is refused, not
    overwritten."""
    weights = tmp_path / "weights"
    done = subprocess.run(
        [sys.executable, "-m", "keras_gemma", "bench", "--config", "tiny", "--backends", "",
         "--compare", "none", "--new-tokens", "2", "--weights-dir", str(weights)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "reusing" not in done.stdout + done.stderr
    written = (weights / "model.safetensors").stat()
    assert (weights / "config.json").exists() and os.listdir(tmp_path) == ["weights"]
    messages = []
    run = dict(
        config="tiny", backends=(), compare=(), new_tokens=2, weights_dir=str(weights),
        log=messages.append,
    )
    header, _ = bench.run_benchmark(**run)
    assert any("reusing" in m for m in messages)
    assert (weights / "model.safetensors").stat().st_mtime_ns == written.st_mtime_ns
    assert header["weights_mb"] == round(written.st_size / 1e6)
    # Weights of another configuration are not taken for these.
    with pytest.raises(ValueError, match="holds the weights of --config tiny"):
        bench.run_benchmark(**{**run, "config": "cpu"})
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds files but no finished benchmark weights"):
        bench.run_benchmark(**{**run, "weights_dir": str(other)})
    assert (other / "notes.txt").read_text() == "mine"


def test_a_failed_reference_still_gives_the_table(monkeypatch, capsys, weights_dir):
    """KerasHub's worker failing lost the whole table, keras_gemma's
    measured rows included."""
    from keras_gemma.cli import build_parser

    backend = keras.config.backend()
    start_worker = bench._Worker.__init__

    def keras_hub_crashes(self, task, worker_backend, options, **kwargs):
        start_worker(self, task, worker_backend, options, **kwargs)
        if options.get("implementation") == "keras_hub":
            self.process.kill()

    monkeypatch.setattr(bench._Worker, "__init__", keras_hub_crashes)
    args = build_parser().parse_args([
        "bench", "--config", "tiny", "--backends", backend, "--compare", "keras_hub",
        "--weights-dir", weights_dir("tiny"),
        "--new-tokens", "4", "--repeats", "1",
    ])
    with pytest.raises(RuntimeError, match=f"keras_hub on {backend} failed"):
        bench.run(args)
    table = capsys.readouterr().out
    ours = next(line for line in table.splitlines() if line.startswith("keras_gemma"))
    assert float(ours.split("|")[2]) > 0  # Its prefill tokens/s.
    assert f"keras_hub (failed) | {backend}" in table


def test_bench_stopped_midway_ends_its_workers_and_shows_their_progress(monkeypatch, capfd, weights_dir):
    """A time limit (SIGTERM, as Ctrl-C) during the timed calls: the worker
    is killed, not left running on the device, and its progress lines say
    where its time went."""
    backend = keras.config.backend()
    workers = []
    start_worker = bench._Worker.__init__

    def started(self, *args, **kwargs):
        start_worker(self, *args, **kwargs)
        workers.append(self)

    def stopped(self, timed_calls):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench._Worker, "__init__", started)
    monkeypatch.setattr(bench._Worker, "finish", stopped)
    with pytest.raises(KeyboardInterrupt):
        bench.run_benchmark(
            config="tiny", backends=(backend,), compare=(), prompt_length=4, new_tokens=2,
            weights_dir=weights_dir("tiny"),
            repeats=1, log=lambda message: None,
        )
    worker = workers[-1]  # The measuring one (after a setup worker, if one ran).
    assert worker.process.returncode is not None and worker.errors.closed
    shown = capfd.readouterr().err
    assert f"bench generate keras_gemma on {backend}, its error output" in shown
    assert "keras_gemma loaded" in shown and "first generate() call" in shown


def test_bench_command_takes_sigterm_as_an_interrupt(monkeypatch):
    """The GPU check stops it with `timeout`: its workers must be killed,
    not left running on the device. The process' handler comes back."""
    from keras_gemma import cli

    def terminated(args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # Python runs the handler at the next instruction.

    monkeypatch.setattr(bench, "run", terminated)
    previous = signal.getsignal(signal.SIGTERM)
    assert cli.main(["bench"]) == 130
    assert signal.getsignal(signal.SIGTERM) is previous


def test_bench_worker_that_dies_is_a_clear_error(weights_dir):
    """A worker that exits between calls (killed for memory, say) is
    reported by name, with how it ended and its error output, not as a
    broken pipe."""
    backend = keras.config.backend()
    bench.run_benchmark(
        config="tiny", backends=(), compare=(), weights_dir=weights_dir("tiny"), log=lambda m: None
    )
    options = dict(
        implementation="keras_gemma", weights=weights_dir("tiny"), batch_size=1, prompt_length=4,
        new_tokens=2, dtype="float32", quantize=None,
    )
    worker = bench._Worker("generate", backend, options)
    try:
        # Only TensorFlow's workers import it (9 s of each start on JAX and PyTorch).
        assert worker.receive() == {"loaded": True, "tensorflow_imported": backend == "tensorflow"}
        assert set(worker.time_one_call()) == {"start", "full", "first"}
        worker.process.kill()
        worker.process.wait()
        expected = f"bench generate keras_gemma on {backend} failed: killed by SIGKILL"
        with pytest.raises(RuntimeError, match=expected):
            worker.time_one_call()
    finally:
        worker.close()
    assert worker.process.returncode is not None and worker.errors.closed


def test_bench_names_each_worker_by_what_it_runs():
    """A failing worker is named by its implementation (llama.cpp's worker
    runs on whatever Keras backend, which is not worth naming), and a signal
    is spelled out."""
    workers = [
        bench._Worker("setup", "jax", {"out": "unused"}),
        bench._Worker("train", "torch", {"implementation": "keras_hub"}),
        bench._Worker("generate", "jax", {"implementation": "llama_cpp"}),
    ]
    for worker in workers:
        worker.close()
    assert [w.name for w in workers] == [
        "bench setup on jax", "bench train keras_hub on torch", "bench generate of llama_cpp",
    ]
    assert bench._exit_status(-signal.SIGILL) == "killed by SIGILL (Illegal instruction)"
    assert bench._exit_status(3) == "exit status 3"


def test_gpu_check_wheels_are_the_pinned_versions():
    """benchmarks/gpu/wheels.sh carries the versions constraints.txt pins."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "constraints.txt")) as f:
        pinned = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", f.read(), re.M))
    with open(os.path.join(root, "benchmarks", "gpu", "wheels.sh")) as f:
        carried = dict(re.findall(r"\b([a-z0-9_-]+)==([0-9][^\s]*)", f.read()))
    assert {"keras", "keras-hub", "optree"} <= set(carried)
    assert {name: pinned.get(name) for name in carried} == carried
    for script in ("wheels.sh", "check.sh"):
        path = os.path.join(root, "benchmarks", "gpu", script)
        assert subprocess.run(["bash", "-n", path]).returncode == 0


def test_bench_llama_cpp_comparison_explains_what_it_needs(monkeypatch, tmp_path):
    """`--compare llama_cpp` needs llama-cpp-python (not a dependency) and
    a GGUF model; each missing piece is a clear error before any run."""
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # Not installed.
    with pytest.raises(ImportError, match="pip install llama-cpp-python"):
        bench.run_benchmark(preset="gemma3_270m", compare=("llama_cpp",), backends=())
    monkeypatch.setitem(sys.modules, "llama_cpp", types.ModuleType("llama_cpp"))
    with pytest.raises(ValueError, match="needs a GGUF model"):
        bench.run_benchmark(config="tiny", compare=("llama_cpp",), backends=())
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    assert bench._gguf_file(str(gguf)) == str(gguf)


def test_bench_shows_an_unmeasurable_decode_speed_as_a_dash():
    """A full call timed no slower than one token gave 3e9 tok/s and
    absurd ratios."""
    rows = [
        dict(implementation="keras_gemma", backend="jax", decode_tokens_per_s=None),
        dict(implementation="keras_hub", backend="jax", decode_tokens_per_s=50.0),
        dict(implementation="keras_gemma", backend="torch", decode_tokens_per_s=80.0),
        dict(implementation="keras_hub", backend="torch", decode_tokens_per_s=None),
    ]
    bench._add_ratios(rows, "decode_tokens_per_s")
    assert [row["vs_keras_hub"] for row in rows] == [None, None, None, None]
    header = dict(
        mode="generate", date="2026-12-05", machine="m", model="tiny", weights_mb=1,
        dtype="float32", quantize=None, batch_size=1, prompt_length=8, new_tokens=4,
        repeats=1,
    )
    first_row = bench.format_table(header, rows).splitlines()[5]
    assert first_row.split(" | ")[3].strip() == "-"


def test_bench_ratios_to_llama_cpp_show_in_the_table():
    rows = [
        dict(implementation="keras_gemma", backend="jax", decode_tokens_per_s=90.0),
        dict(implementation="llama_cpp", backend="gguf", decode_tokens_per_s=60.0),
    ]
    bench._add_ratios(rows, "decode_tokens_per_s")
    assert rows[0]["vs_llama_cpp"] == pytest.approx(1.5) and rows[1]["vs_llama_cpp"] is None
    header = dict(
        mode="generate", date="2026-11-27", machine="m", model="gemma3_270m", weights_mb=1,
        dtype="float32", quantize="int8", batch_size=1, prompt_length=32, new_tokens=64,
        repeats=3,
    )
    table = bench.format_table(header, rows)
    assert "decode vs llama_cpp" in table and "1.50x" in table
    # Only the ratios to what ran: no columns of dashes for KerasHub and transformers.
    assert "vs keras_hub" not in table and "vs transformers" not in table


@pytest.mark.parametrize(
    "flags, compared",
    [([], ("keras_hub", "transformers")), (["--compare", ""], ()), (["--compare", "none"], ()),
     (["--compare", "keras_hub"], ("keras_hub",)), (["--mode", "train", "--compare", ""], ())],
)
def test_bench_compares_what_the_command_line_asks(monkeypatch, flags, compared):
    """`--compare ""` (an empty shell variable) compares nothing, as before
    `--compare` got a default of its own."""
    import argparse

    asked = []

    def recorded(**kwargs):
        asked.append(kwargs["compare"])
        raise KeyboardInterrupt  # Stop before running anything.

    monkeypatch.setattr(bench, "run_benchmark", recorded)
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    with pytest.raises(KeyboardInterrupt):
        bench.run(parser.parse_args(["--config", "tiny", *flags]))
    assert asked == [compared]


def test_help_shows_every_default():
    """`keras-gemma bench --help` named no default for most options
    (--new-tokens, --steps, ...): a user could not tell what a run measures."""
    import argparse

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    parser.format_help()  # Every help text expands.
    for action in parser._actions:
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            # As argparse expands it for --help.
            assert f"default: {action.default}" in (action.help or "") % vars(action), action.dest


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="Linux's /proc")
def test_peak_memory_is_the_workers_own_not_that_of_the_process_that_started_it():
    """Workers start through `subprocess` (vfork): `getrusage`'s peak gave
    each the peak of the process that started it (every row of a run from
    a notebook that had held 3 GB said 3 GB)."""
    import numpy as np

    held = np.ones(3 * 2**30, np.uint8)  # 3 GB, every page written.
    del held
    script = (
        "import resource; from keras_gemma import bench; "
        "print(bench._peak_rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
    )
    ours, getrusage = map(int, subprocess.check_output([sys.executable, "-c", script], text=True).split())
    assert ours < 2e9, (ours, getrusage)  # Importing keras_gemma (Keras, TensorFlow): ~0.9 GB.
