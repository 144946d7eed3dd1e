"""The `keras-gemma` command line (also `python -m keras_gemma`).

    keras-gemma generate "The capital of France is"
    echo "Once upon a time" | keras-gemma generate --sampler top_p --top-p 0.9
    keras-gemma chat --system "Answer briefly."
    keras-gemma convert model.gguf ./my_preset
    keras-gemma bench --backends jax,torch

Bad input exits non-zero with a one-line explanation and no traceback.
"""

import argparse
import contextlib
import itertools
import json
import os
import sys

from keras_gemma import __version__
from keras_gemma.bench import BACKENDS
from keras_gemma.checkpoints.convert import QUANTIZATION_MODES
from keras_gemma.checkpoints.convert import WEIGHT_DTYPES
from keras_gemma.presets import catalog
from keras_gemma.presets import check_preset
from keras_gemma.presets import context_length

DEFAULT_PRESET = "gemma3_270m"


class CommandError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # One line instead of usage + error.
        raise CommandError(f"{self.prog}: {message} (see --help)")


def _whole_number(text, minimum=1, maximum=None):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected a number >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise argparse.ArgumentTypeError(f"expected a number <= {maximum}, got {value}")
    return value


def _positive_int(text):
    return _whole_number(text, minimum=1)


# Keras keeps a seed in the backend's seed dtype: int32 on PyTorch (a larger
# one failed mid-generation with a traceback: OverflowError on JAX).
MAX_SEED = 2**31 - 1


def _seed(text):
    return _whole_number(text, minimum=0, maximum=MAX_SEED)


def _number(text):
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _temperature(text):
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(
            f"expected a number > 0, got {text!r} (for deterministic output use --sampler greedy)"
        )
    return value


def _probability(text):
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def _model_options(parser):
    parser.add_argument(
        "--preset", default=DEFAULT_PRESET,
        help=f"catalog name, kaggle:// or hf:// handle, or local path "
        f"(preset dir, HF dir, .gguf, .ckpt); default {DEFAULT_PRESET}",
    )
    parser.add_argument(
        "--backend", choices=BACKENDS,
        help="Keras backend (default: $KERAS_BACKEND, else the backend in "
        "keras.json unless tensorflow, Keras' own default, else jax)",
    )
    parser.add_argument("--dtype", help=f"compute dtype: {', '.join(WEIGHT_DTYPES)} (default float32)")
    parser.add_argument("--sampler", choices=SAMPLER_OPTIONS, default="greedy", help="default greedy")
    parser.add_argument("--temperature", type=_temperature, help="for sampling, > 0 (default 1.0)")
    parser.add_argument("--top-k", type=_positive_int, help="for top_k (default 10)")
    parser.add_argument("--top-p", type=_probability, help="for top_p, in (0, 1] (default 0.9)")
    parser.add_argument("--seed", type=_seed, help=f"random seed for sampling (0 to {MAX_SEED})")


def build_parser():
    parser = _Parser(prog="keras-gemma", description="Run and convert Gemma models with Keras.")
    parser.add_argument("--version", action="version", version=f"keras-gemma {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    generate = commands.add_parser(
        "generate", help="continue a prompt, streaming tokens",
        description="Continue a prompt (argument or stdin), printing tokens as they come.",
    )
    generate.add_argument("prompt", nargs="?", help="the prompt; read from stdin when omitted or - (less its final line break)")
    _model_options(generate)
    lengths = generate.add_mutually_exclusive_group()
    lengths.add_argument(
        "--max-length", type=_positive_int, default=128,
        help="total tokens, prompt included (default 128)",
    )
    lengths.add_argument(
        "--max-new-tokens", type=_positive_int,
        help="new tokens after the prompt, however long it is (instead of --max-length)",
    )

    chat = commands.add_parser(
        "chat", help="interactive chat with the Gemma chat template",
        description="Chat turn by turn (Gemma chat template; stops at <end_of_turn>). "
        "Empty line or Ctrl-D ends the session.",
    )
    chat.add_argument("--system", help="system instruction (prepended to the first user turn)")
    _model_options(chat)
    chat.add_argument(
        "--max-new-tokens", type=_positive_int, default=128,
        help="longest reply in tokens (default 128); the conversation so far "
        "is the prompt of each reply",
    )

    convert = commands.add_parser(
        "convert", help="convert a checkpoint to a keras_gemma preset or to transformers",
        description="Convert any supported source (catalog name, .gguf, .ckpt, HF or "
        "Keras preset directory) into a Keras preset directory, or with "
        "--to transformers into a Hugging Face directory. The destination must not exist.",
    )
    convert.add_argument("source", help="catalog name, kaggle:// or hf:// handle, file or directory")
    convert.add_argument("destination", help="a new directory")
    convert.add_argument(
        "--to", choices=("keras", "transformers"), default="keras", help="output format (default keras)"
    )
    convert.add_argument("--backend", choices=BACKENDS, help="Keras backend for the conversion")
    convert.add_argument(
        "--dtype",
        help="weights dtype of the output, e.g. bfloat16 (a Keras preset then loads "
        "in Keras' default dtype unless from_preset gets dtype=, as KerasHub's do)",
    )

    bench = commands.add_parser(
        "bench", help="generation or LoRA training speed per backend vs KerasHub and transformers",
        description="Time generate() (or, with --mode train, LoRA training steps) "
        "on each Keras backend (one process each) next to KerasHub's "
        "GemmaCausalLM and transformers on the same weights; print one table. "
        "Run nothing else meanwhile.",
    )
    from keras_gemma import bench as bench_module

    bench_module.add_arguments(bench)
    return parser


@contextlib.contextmanager
def _native_logs_silenced():
    """Hide what native libraries write to the error output (file
    descriptor 2) in the block: TF/XLA start-up lines, SentencePiece info.
    What Python writes to `sys.stderr` still shows (a download's progress
    bar, warnings), and Python errors propagate."""
    sys.stderr.flush()
    saved, python_stderr = os.dup(2), sys.stderr
    sys.stderr = os.fdopen(os.dup(saved), "w", buffering=1, errors="replace")
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        sys.stderr.close()
        sys.stderr = python_stderr
        os.dup2(saved, 2)
        os.close(saved)


# The options each sampler takes, with their defaults.
SAMPLER_OPTIONS = {
    "greedy": {},
    "top_k": {"top_k": 10, "temperature": 1.0, "seed": None},
    "top_p": {"top_p": 0.9, "temperature": 1.0, "seed": None},
    "random": {"temperature": 1.0, "seed": None},
}


def _sampler_options(args):
    """`--sampler`'s options, defaults filled in; an option it would ignore
    is an error (greedy is the default: `--temperature` alone would
    silently do nothing)."""
    options = SAMPLER_OPTIONS[args.sampler]
    for name in ("temperature", "top_k", "top_p", "seed"):
        if getattr(args, name) is not None and name not in options:
            takers = " or ".join(s for s, taken in SAMPLER_OPTIONS.items() if name in taken)
            raise CommandError(
                f"keras-gemma: --{name.replace('_', '-')} has no effect with --sampler {args.sampler}; "
                f"use --sampler {takers}"
            )
    return {name: default if getattr(args, name) is None else getattr(args, name)
            for name, default in options.items()}


def _sampler(name, options, samplers):
    if name == "greedy":
        return "greedy"  # Ours: see GemmaCausalLM.compile.
    if name == "top_k":
        return samplers.TopKSampler(k=options.pop("top_k"), **options)
    if name == "top_p":
        return samplers.TopPSampler(p=options.pop("top_p"), **options)
    return samplers.RandomSampler(**options)


def _load(args):
    # Mistakes in the command line first: Keras and its backend take seconds
    # to import.
    check_preset(args.preset)
    if args.dtype and args.dtype.lower() in QUANTIZATION_MODES:
        raise CommandError(
            f"keras-gemma: --dtype {args.dtype} is a quantization mode, not a dtype; pass "
            "--dtype bfloat16 or float32. For a quantized model, save one from Python "
            f"(gemma_lm.quantize({args.dtype.lower()!r}); gemma_lm.save_to_preset(dir)) and pass --preset dir."
        )
    if args.dtype and args.dtype not in WEIGHT_DTYPES:
        raise CommandError(f"keras-gemma: --dtype {args.dtype!r} is not one of {', '.join(WEIGHT_DTYPES)}")
    options = _sampler_options(args)
    with _native_logs_silenced():
        import keras_hub

        import keras_gemma
        from keras_gemma.models.samplers import check_sampler

    sampler = _sampler(args.sampler, options, keras_hub.samplers)
    if sampler != "greedy":
        check_sampler(sampler)  # Before the model loads, which takes a while.
    kwargs = {"dtype": args.dtype} if args.dtype else {}
    with _native_logs_silenced():
        gemma_lm = keras_gemma.GemmaCausalLM.from_preset(args.preset, **kwargs)
    gemma_lm.compile(sampler=sampler)
    return gemma_lm


def _stream(gemma_lm, prompt, max_length, resume=False, echo=""):
    """Print `echo`, then the continuation as it is generated; return it.
    A prompt that does not fit prints nothing."""
    from keras_gemma.models.streaming import stream_text

    stream = stream_text(gemma_lm, prompt, max_length=max_length, resume=resume)
    first = next(stream, None)  # Checks the prompt before anything prints.
    sys.stdout.write(echo)
    pieces = []
    for piece in itertools.chain([] if first is None else [first], stream):
        pieces.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    return "".join(pieces)


def _check_utf8(text):
    """Bytes that are not UTF-8 reach Python as lone surrogates, which the
    tokenizer failed on with a Keras traceback after the model had loaded."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        byte = ord(text[error.start]) - 0xDC00  # Python's surrogateescape.
        shown = f"byte 0x{byte:02x}" if 0x80 <= byte <= 0xFF else "a character"
        raise CommandError(
            f"keras-gemma: the text is not valid UTF-8 ({shown} at position {error.start}); "
            "convert it first, e.g. with iconv -f latin1 -t utf-8"
        ) from None


def _check_context(max_length, context, preset):
    """Positions past the trained context degrade the text: refused here
    (the Python API warns)."""
    if max_length > context:
        raise CommandError(
            f"keras-gemma: --max-length {max_length} is past the {context} tokens that "
            f"{preset} was trained on; pass --max-length {context} or less"
        )


def run_generate(args):
    if args.prompt not in (None, "-"):
        prompt = args.prompt
    else:  # `echo ... |` ends the text with a line break the prompt does not have.
        prompt = sys.stdin.read().removesuffix("\n").removesuffix("\r")
    if not prompt.strip():
        raise CommandError("keras-gemma: the prompt is empty; pass it as an argument or on stdin")
    _check_utf8(prompt)
    if args.preset in catalog():  # Known before loading (the prompt has at least <bos>).
        context = context_length(catalog()[args.preset]["config"])
        if args.max_new_tokens is None:
            _check_context(args.max_length, context, args.preset)
        elif args.max_new_tokens >= context:
            raise CommandError(
                f"keras-gemma: --max-new-tokens {args.max_new_tokens} and the prompt are past the "
                f"{context} tokens that {args.preset} was trained on; pass fewer new tokens"
            )
    gemma_lm = _load(args)
    prompt_tokens = gemma_lm.preprocessor.prompt_token_count(prompt)
    if args.max_new_tokens is not None:
        args.max_length = prompt_tokens + args.max_new_tokens
        context = gemma_lm.backbone.context_length
        if prompt_tokens >= context:
            raise CommandError(
                f"keras-gemma: the prompt alone is {prompt_tokens} tokens, which leaves no room "
                f"in the {context} tokens that {args.preset} was trained on; shorten it"
            )
        if args.max_length > context:
            raise CommandError(
                f"keras-gemma: the prompt ({prompt_tokens} tokens) and --max-new-tokens "
                f"{args.max_new_tokens} are past the {context} tokens that {args.preset} was "
                f"trained on; pass --max-new-tokens {context - prompt_tokens} or less"
            )
    _check_context(args.max_length, gemma_lm.backbone.context_length, args.preset)
    if prompt_tokens >= args.max_length:
        template = " and the chat template" if gemma_lm.preprocessor.apply_chat_template else ""
        raise CommandError(
            f"keras-gemma: the prompt is {prompt_tokens} tokens (with <bos>{template}), which "
            f"leaves no room in --max-length {args.max_length}: it counts the prompt and the "
            f"reply; pass --max-length {prompt_tokens + 64} or more, or shorten the prompt"
        )
    _stream(gemma_lm, prompt, args.max_length, echo=prompt)
    sys.stdout.write("\n")


def run_chat(args):
    from keras_gemma.chat import format_chat

    if args.system:
        _check_utf8(args.system)
    gemma_lm = _load(args)
    if "<end_of_turn>" not in gemma_lm.preprocessor.stop_tokens:
        # Instruction-tuned presets stop on <end_of_turn>; base models do not.
        print(
            f"note: {args.preset} is a base model, not instruction-tuned: its "
            "replies may wander. An instruction-tuned preset (e.g. --preset "
            "gemma3_instruct_270m, from Kaggle) follows a chat.",
            file=sys.stderr,
        )
        gemma_lm.preprocessor.stop_tokens = [*gemma_lm.preprocessor.stop_tokens, "<end_of_turn>"]
    turns = [{"role": "system", "content": args.system}] if args.system else []
    while True:
        try:
            text = input("you> ")
        except EOFError:  # Ctrl-D: end the prompt's line for the shell.
            sys.stdout.write("\n")
            break
        if not text.strip():
            break
        try:
            _check_utf8(text)
        except CommandError as error:  # Ask again: the chat so far stays.
            print(error, file=sys.stderr)
            continue
        turns.append({"role": "user", "content": text})
        sys.stdout.write("gemma> ")
        prompt = format_chat(turns)
        prompt_length = gemma_lm.preprocessor.prompt_token_count(prompt)
        # Replies end at the context the model was trained on.
        context = gemma_lm.backbone.context_length
        if prompt_length + 1 > context:
            sys.stdout.write("\n")
            raise CommandError(
                f"keras-gemma: the conversation ({prompt_length} tokens) leaves no room in the "
                f"{context} tokens that {args.preset} was trained on; start a new chat"
            )
        try:
            # Each turn prefills only its new tokens: the conversation so
            # far is still in the cache.
            max_length = min(prompt_length + args.max_new_tokens, context)
            reply = _stream(gemma_lm, prompt, max_length, resume=True)
        except KeyboardInterrupt:  # Ctrl-C stops the reply, not the chat.
            print("\n(stopped; this turn is forgotten)", file=sys.stderr)
            turns.pop()
            continue
        sys.stdout.write("\n")
        turns.append({"role": "model", "content": reply})


def run_convert(args):
    check_preset(args.source)  # Before Keras imports, as in _load.
    # A SIGTERM left the half-written directory.
    with _native_logs_silenced(), _interrupted_by_sigterm():
        from keras_gemma.checkpoints.convert import convert

        convert(args.source, args.destination, to=args.to, dtype=args.dtype)
    print(f"wrote {args.destination}")


def run_bench(args):
    from keras_gemma.bench import run

    # Its workers are killed, not left running on the device, and their
    # progress shown (the GPU check stops it with `timeout`).
    with _interrupted_by_sigterm():
        run(args)


@contextlib.contextmanager
def _interrupted_by_sigterm():
    """`timeout` or `kill` (SIGTERM) end the block as Ctrl-C does, so that
    it cleans up what it started. The process' own handler comes back
    after (`main()` called from Python); outside the main thread, where
    Python allows no handler, nothing changes."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        # `timeout` signals our process group too: once is enough.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv=None):
    try:
        args = build_parser().parse_args(argv)
        # bench runs each backend in a process of its own (--backends).
        _choose_backend(getattr(args, "backend", None), check=args.command != "bench")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        if args.command in ("generate", "chat"):
            _keep_compiled_code()
        # Generated text on a terminal or file that is not UTF-8: "?" for
        # what it cannot show, rather than failing mid-reply.
        if hasattr(sys.stdout, "reconfigure"):
            sys.stdout.reconfigure(errors="replace")
        # Bytes that are not UTF-8 read as lone surrogates, for
        # `_check_utf8` to explain: Python does so only under C/POSIX
        # locales; under others (en_US.UTF-8) reading raised.
        try:
            sys.stdin.reconfigure(errors="surrogateescape")
        except (AttributeError, ValueError, OSError):
            pass  # Not a text file, or already read from (`main()` from Python).
        commands = {
            "generate": run_generate, "chat": run_chat, "convert": run_convert,
            "bench": run_bench,
        }
        commands[args.command](args)
    except BrokenPipeError:
        # The reader stopped early (`keras-gemma generate ... | head`): not an
        # error. Output still buffered goes nowhere instead of failing again
        # at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except CommandError as e:
        return _fail(str(e))
    except KeyError as e:  # str() of a KeyError quotes its message.
        return _fail(f"keras-gemma: {e.args[0] if e.args else e}")
    except (ValueError, TypeError, OSError, ImportError, RuntimeError) as e:
        return _fail(f"keras-gemma: {e}")
    except KeyboardInterrupt:
        sys.stdout.write("\n")  # End a half-written line before the message.
        sys.stdout.flush()
        _fail("keras-gemma: interrupted")
        return 130  # As shells report a SIGINT: scripts tell it from an error.
    return 0


def _choose_backend(backend, check=True):
    """`--backend`, else $KERAS_BACKEND, else keras.json's unless Keras
    wrote its default there, else JAX (see `_configured_backend`), before
    Keras is imported; with `check`, one keras_gemma does not run on
    is refused. Run in a process that already imported Keras (`main()`
    called from Python), its backend stays and `--backend` must agree."""
    if "keras" in sys.modules:
        import keras

        if backend and backend != keras.config.backend():
            raise CommandError(
                f"keras-gemma: --backend {backend}, but this Python process "
                f"already runs Keras on {keras.config.backend()}; a backend is "
                "chosen before Keras is imported: run keras-gemma as a command"
            )
        return
    if backend:
        os.environ["KERAS_BACKEND"] = backend
        return
    backend, source = _configured_backend()
    if backend in BACKENDS:
        os.environ["KERAS_BACKEND"] = backend
    elif check:
        raise CommandError(
            f"keras-gemma: the Keras backend is {backend!r} (from {source}), which "
            f"keras_gemma does not run on; pass --backend {' or '.join(BACKENDS)}, "
            "or set KERAS_BACKEND"
        )


# Most compiled code kept on disk per backend for the next command.
COMPILED_CODE_BYTES = 1 << 30


def _keep_compiled_code():
    """Each command is a new process, which would compile `generate()`'s
    steps again: keep JAX's or TensorFlow's compiled code on disk under
    `cache_dir()/compiled/` for the next command, as PyTorch's Inductor
    does by itself. The process's own settings (JAX_COMPILATION_CACHE_DIR,
    TF_XLA_FLAGS) win, and `main()` called from Python leaves its process's
    settings alone (Keras, and with it the backend, is already imported)."""
    if "keras" in sys.modules:
        return
    from keras_gemma.checkpoints.pypi_model import cache_dir

    backend = os.environ["KERAS_BACKEND"]
    directory = os.path.abspath(os.path.join(cache_dir(), "compiled", backend))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError:
        return
    if not os.access(directory, os.W_OK):  # A read-only cache: JAX warned 11 times.
        return
    if backend == "jax" and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        os.environ["JAX_COMPILATION_CACHE_DIR"] = directory
        # JAX drops the least recently used entries past this size.
        os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(COMPILED_CODE_BYTES))
    tf_flags = os.environ.get("TF_XLA_FLAGS", "")
    # XLA's flag parser ends a value at white space: such a path would not work.
    plain_path = not any(c.isspace() or c in "'\"" for c in directory)
    if backend == "tensorflow" and plain_path and "--tf_xla_persistent_cache_directory" not in tf_flags:
        _drop_oldest_files(directory, COMPILED_CODE_BYTES)  # TensorFlow never does.
        os.environ["TF_XLA_FLAGS"] = f"{tf_flags} --tf_xla_persistent_cache_directory={directory}".strip()


def _drop_oldest_files(directory, max_bytes):
    """Delete the least recently modified files of `directory` until the
    rest take at most `max_bytes`."""
    try:
        entries = [e for e in os.scandir(directory) if e.is_file(follow_symlinks=False)]
    except FileNotFoundError:
        return
    entries.sort(key=lambda e: e.stat().st_mtime, reverse=True)
    kept = 0
    for entry in entries:
        kept += entry.stat().st_size
        if kept > max_bytes:
            with contextlib.suppress(FileNotFoundError):  # Another command's deletion.
                os.remove(entry.path)


def _configured_backend():
    """`(backend, where it is set)` as Keras reads it when imported:
    $KERAS_BACKEND, else `backend` in keras.json in $KERAS_HOME (else
    ~/.keras, or /tmp/.keras where the home directory is not writable;
    keras/src/backend/config.py) unless it is Keras' default, else JAX."""
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"], "$KERAS_BACKEND"
    if "KERAS_HOME" in os.environ:
        keras_dir = os.environ["KERAS_HOME"]
    else:
        home = os.path.expanduser("~")
        keras_dir = os.path.join(home if os.access(home, os.W_OK) else "/tmp", ".keras")
    path = os.path.expanduser(os.path.join(keras_dir, "keras.json"))
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):  # Missing, unreadable or not JSON: Keras ignores it too.
        config = {}
    # Keras writes its default, tensorflow, there by itself on its first
    # import: not a choice, so ours applies (JAX, the fastest here).
    if isinstance(config, dict) and config.get("backend") not in (None, "", "tensorflow"):
        return config["backend"], path
    return "jax", "keras_gemma's default"


def _fail(message):
    print(" ".join(str(message).split()), file=sys.stderr)
    return 1
