"""The command line: generation, conversion and one-line errors."""

import io
import os
import shlex
import subprocess
import sys

import keras
import pytest

import keras_gemma
from keras_gemma import cli as cli_module
from keras_gemma.cli import main
from tests import helpers
from tests.test_presets import randomize_weights


@pytest.fixture(scope="module")
def preset_dir(tmp_path_factory, spm_proto, vocabulary_size):
    backbone = keras_gemma.GemmaBackbone(vocabulary_size=vocabulary_size, **helpers.TINY_MQA)
    randomize_weights(backbone)
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor(
        keras_gemma.GemmaTokenizer(proto=spm_proto), sequence_length=16
    )
    path = tmp_path_factory.mktemp("cli") / "preset"
    keras_gemma.GemmaCausalLM(backbone, preprocessor).save_to_preset(str(path))
    return str(path)


def cli(*args, stdin="", **env_vars):
    env = {**os.environ, "KERAS_BACKEND": keras.config.backend(), **env_vars}
    return subprocess.run(
        [sys.executable, "-m", "keras_gemma", *args],
        input=stdin, capture_output=True, text=True, env=env, timeout=600,
    )


def test_generate_streams_a_continuation(preset_dir):
    done = cli("generate", "hello", "--preset", preset_dir, "--max-length", "12")
    assert done.returncode == 0, done.stderr[-2000:]
    gemma_lm = keras_gemma.GemmaCausalLM.from_preset(preset_dir)
    expected = gemma_lm.generate("hello", max_length=12)
    assert done.stdout.strip() == expected.strip()
    assert len(expected) > len("hello")


@pytest.mark.skipif(
    keras.config.backend() == "torch",
    reason="the command runs PyTorch eagerly (Inductor keeps its own cache on disk)",
)
def test_a_second_command_reuses_the_compiled_code_of_the_first(preset_dir, tmp_path):
    """Each command is a new process, which compiled generate()'s steps
    again; JAX's and TensorFlow's compiled code is now kept under the cache
    directory, and a second command with the same shapes writes nothing new."""
    env = {
        "JAX_COMPILATION_CACHE_DIR": "", "TF_XLA_FLAGS": "",  # Ours, not the machine's.
        "KERAS_GEMMA_CACHE": str(tmp_path),
        "KERAS_GEMMA_TF_XLA": "1",  # The suite runs TensorFlow without XLA.
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",  # The tiny model compiles in < 1 s.
    }
    compiled = tmp_path / "compiled" / keras.config.backend()

    def entries():  # JAX's "...-atime" files record each entry's last use.
        return {p.name: p.stat().st_mtime_ns for p in compiled.iterdir() if not p.name.endswith("-atime")}

    first = cli("generate", "hello", "--preset", preset_dir, "--max-length", "12", **env)
    assert first.returncode == 0, first.stderr[-2000:]
    written = entries()
    assert written
    second = cli("generate", "hello", "--preset", preset_dir, "--max-length", "12", **env)
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stdout == first.stdout
    assert entries() == written


def test_main_called_from_python_leaves_compilation_settings_alone(preset_dir, capsys):
    before = dict(os.environ)
    assert main(["generate", "hello", "--preset", preset_dir, "--max-length", "12"]) == 0
    assert {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"} == {
        k: v for k, v in before.items() if k != "TF_CPP_MIN_LOG_LEVEL"
    }


@pytest.mark.parametrize("writable", [True, False])
def test_compiled_code_is_kept_only_where_the_cache_is_writable(monkeypatch, tmp_path, writable):
    """A read-only cache made JAX warn 11 times per command."""
    monkeypatch.delitem(sys.modules, "keras")  # As in a new command, before Keras loads.
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    monkeypatch.setenv("KERAS_GEMMA_CACHE", str(tmp_path))
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_MAX_SIZE", "1")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: writable and real_access(path, mode))
    cli_module._keep_compiled_code()
    expected = str(tmp_path / "compiled" / "jax") if writable else ""
    assert os.environ["JAX_COMPILATION_CACHE_DIR"] == expected


def test_kept_compiled_code_drops_the_oldest_files_past_the_limit(tmp_path):
    for age, name in enumerate(["newest", "middle", "oldest"]):
        path = tmp_path / name
        path.write_bytes(b"x" * 100)
        os.utime(path, (1000 - age, 1000 - age))
    cli_module._drop_oldest_files(str(tmp_path), max_bytes=250)
    assert sorted(os.listdir(tmp_path)) == ["middle", "newest"]
    cli_module._drop_oldest_files(str(tmp_path / "missing"), max_bytes=0)  # Nothing kept yet.


def test_generate_reads_the_prompt_from_stdin(preset_dir, monkeypatch, capsys):
    """`echo hello |` gives the text of `generate hello` (the line break
    that echo adds was part of the prompt)."""
    gemma_lm = keras_gemma.GemmaCausalLM.from_preset(preset_dir)
    for prompt_argument in ([], ["-"]):  # "-" for stdin, as other commands read it.
        monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
        assert main(["generate", *prompt_argument, "--preset", preset_dir, "--max-length", "12"]) == 0
        assert capsys.readouterr().out.strip() == gemma_lm.generate("hello", max_length=12).strip()


def test_generate_max_new_tokens(preset_dir, capsys):
    """--max-new-tokens instead of --max-length: new tokens whatever the
    prompt's length; the two together, or past the context, are refused."""
    gemma_lm = keras_gemma.GemmaCausalLM.from_preset(preset_dir)
    prompt = "hello world, hello again"
    assert main(["generate", prompt, "--preset", preset_dir, "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() == gemma_lm.generate(prompt, max_new_tokens=5).strip()
    assert main(["generate", "hi", "--preset", preset_dir, "--max-length", "12", "--max-new-tokens", "5"]) == 1
    assert "not allowed with argument --max-length" in capsys.readouterr().err
    context = gemma_lm.backbone.context_length
    tokens = gemma_lm.preprocessor.prompt_token_count(prompt)
    assert main(["generate", prompt, "--preset", preset_dir, "--max-new-tokens", str(context)]) == 1
    assert (
        f"the prompt ({tokens} tokens) and --max-new-tokens {context} are past the {context} "
        f"tokens that {preset_dir} was trained on; pass --max-new-tokens {context - tokens} or less"
    ) in capsys.readouterr().err
    long_prompt = "hello " * context
    assert main(["generate", long_prompt, "--preset", preset_dir, "--max-new-tokens", "1"]) == 1
    assert "which leaves no room in the" in capsys.readouterr().err


def test_output_a_terminal_cannot_encode_is_replaced(preset_dir, monkeypatch):
    """A non-UTF-8 stdout failed at the first character it has no code for."""
    terminal = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    monkeypatch.setattr("sys.stdout", terminal)
    assert main(["generate", "h\u00e9llo", "--preset", preset_dir, "--max-length", "12"]) == 0
    terminal.flush()
    assert terminal.buffer.getvalue().startswith(b"h?llo")


def test_chat_template_counts_in_the_prompt_length(tokenizer, tmp_path, capsys):
    """The length check counted the prompt without the template, and the
    library's message about generate()'s max_length came instead."""
    backbone = keras_gemma.GemmaBackbone(vocabulary_size=tokenizer.vocabulary_size(), **helpers.TINY_MQA)
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor(tokenizer, apply_chat_template=True)
    keras_gemma.GemmaCausalLM(backbone, preprocessor).save_to_preset(str(tmp_path))
    prompt = "hello there"
    tokens = preprocessor.prompt_token_count(prompt)
    assert tokens == len(tokenizer(keras_gemma.format_chat([{"role": "user", "content": prompt}]))) + 1
    assert tokens > len(tokenizer(prompt)) + 1 + 4
    # A prompt that fills --max-length leaves no room for the reply.
    assert main(["generate", prompt, "--preset", str(tmp_path), "--max-length", str(tokens)]) == 1
    message = f"the prompt is {tokens} tokens (with <bos> and the chat template), which leaves no room in --max-length {tokens}"
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "hi", "--preset", "no_such_preset"], "Unknown preset 'no_such_preset'"),
        (["generate", "hi", "--backend", "numpy"], "invalid choice: 'numpy'"),
        (["generate", ""], "the prompt is empty"),
        # The catalog's model: refused before it loads.
        (["generate", "hi", "--max-length", "40000"],
         "--max-length 40000 is past the 32768 tokens that gemma3_270m was trained on; pass --max-length 32768 or less"),
        (["generate", "hi", "--max-length", "lots"], "expected a whole number, got 'lots'"),
        (["generate", "hi", "--temperature", "hot"], "invalid float value: 'hot'"),
        (["generate", "hi", "--temperature", "0.7"],
         "--temperature has no effect with --sampler greedy; use --sampler top_k or top_p or random"),
        (["generate", "hi", "--sampler", "top_p", "--top-k", "5"],
         "--top-k has no effect with --sampler top_p; use --sampler top_k"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["generate", "hi", "--sampler", "random", "--seed", "-5"], "expected a number >= 0, got -5"),
        # A seed past int32 failed mid-generation with a traceback; the
        # sampler's numbers are checked in the command's terms.
        (["generate", "hi", "--sampler", "random", "--seed", "4294967296"],
         "argument --seed: expected a number <= 2147483647, got 4294967296"),
        (["generate", "hi", "--sampler", "random", "--temperature", "0"],
         "argument --temperature: expected a number > 0, got '0' (for deterministic output use --sampler greedy)"),
        (["generate", "hi", "--sampler", "random", "--temperature", "nan"],
         "argument --temperature: expected a finite number, got 'nan'"),
        (["generate", "hi", "--sampler", "top_p", "--top-p", "1.5"],
         "argument --top-p: expected a number in (0, 1], got '1.5'"),
        (["bench", "--batch-size", "0"], "batch_size=0: must be whole numbers >= 1"),
        (["bench", "--dtype", "float64"], "dtype must be float32 or bfloat16, got 'float64'"),
        # Before any worker starts (these printed a worker's traceback, an
        # empty table, or failed after the whole run).
        (["bench", "--config", "gemma_2b"], "Unknown --config 'gemma_2b': use one of ['cpu', 'tiny', 'tiny_gemma3'] or a catalog name (e.g. gemma_2b_en"),
        (["bench", "--preset", "nope"], "Unknown preset 'nope'"),
        (["bench", "--backends", ""], "No --backends given"),
        (["bench", "--json", "."], "--json . is a directory"),
        (["bench", "--json", "/no/such/directory/out.json"], "/no/such/directory is not a directory to write it in"),
        # Options of the other mode were ignored without a word.
        (["bench", "--steps", "9"], "--steps applies to --mode train only; this run is --mode generate"),
        (["bench", "--mode", "train", "--new-tokens", "8"], "--new-tokens applies to --mode generate only"),
        (["bench", "--loss-fraction", "0.5"], "--loss-fraction applies to --mode train only"),
        (["bench", "--mode", "train", "--loss-fraction", "0"], "loss_fraction must be above 0 and at most 1, got 0.0"),
        # A reference that cannot run the mode: the whole run compared nothing.
        (["bench", "--mode", "train", "--compare", "llama_cpp"],
         "--compare llama_cpp cannot run this benchmark (no training); drop it"),
        (["bench", "--quantize", "int8", "--compare", "keras_hub,transformers"],
         "--compare transformers cannot run this benchmark (no --quantize int8 here)"),
    ],
)
def test_bad_input_is_one_line_without_traceback(args, message):
    done = cli(*args)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr  # One line: no traceback, no native log noise.
    assert message in lines[0]


def test_mistakes_in_the_command_line_are_refused_before_keras_loads(tmp_path):
    """A misspelt preset, conversion source or config, or a sampler option
    the sampler would ignore, was reported only after Keras and its backend
    had imported (7 to 12 s here)."""
    script = tmp_path / "keras-gemma"  # The command, saying whether Keras was imported.
    script.write_text(
        "import sys\nfrom keras_gemma.cli import main\nstatus = main()\n"
        "print(status, 'keras' in sys.modules)\n"
    )
    mistakes = {
        ("generate", "hi", "--preset", "gemma3_27"): "Did you mean 'gemma3_270m'",
        ("chat", "--preset", "nope"): "Unknown preset 'nope'",
        ("generate", "hi", "--sampler", "top_p", "--top-k", "5"): "--top-k has no effect",
        ("generate", "hi", "--dtype", "int8"): "--dtype int8 is a quantization mode, not a dtype; pass --dtype bfloat16",
        ("generate", "hi", "--dtype", "float64x"): "--dtype 'float64x' is not one of float32, bfloat16, float16",
        # Bytes that are not UTF-8 (argv passes them as lone surrogates).
        ("generate", "caf\udce9"): "the text is not valid UTF-8 (byte 0xe9 at position 3)",
        ("bench", "--preset", "nope"): "Unknown preset 'nope'",
        ("bench", "--config", "gemma_2b"): "Unknown --config 'gemma_2b'",
        ("bench", "--mode", "train", "--repeats", "2"): "--repeats applies to --mode generate only",
        ("generate", "hi", "--max-length", "32769"): "--max-length 32769 is past the 32768 tokens",
        ("generate", "hi", "--max-new-tokens", "32768"): "--max-new-tokens 32768 and the prompt are past the 32768 tokens",
        ("convert", "gemma3_27", str(tmp_path / "out")): "Did you mean 'gemma3_270m'",
    }
    for args, message in mistakes.items():
        done = subprocess.run(
            [sys.executable, str(script), *args], capture_output=True, text=True, timeout=600,
            env={**os.environ, "KERAS_BACKEND": keras.config.backend()},
        )
        assert done.stdout.split() == ["1", "False"], done.stderr[-2000:]
        assert done.stderr.startswith("keras-gemma: ") and message in done.stderr
    assert sorted(os.listdir(tmp_path)) == ["keras-gemma"]


def test_a_prompt_longer_than_max_length_prints_only_the_error(preset_dir, capsys):
    assert main(["generate", "hello world again", "--preset", preset_dir, "--max-length", "2"]) == 1
    done = capsys.readouterr()
    assert done.out == ""
    # In the CLI's terms (generate()'s error named its max_length argument).
    tokens = len(keras_gemma.GemmaTokenizer.from_preset(preset_dir)("hello world again")) + 1
    assert done.err.strip().splitlines() == [
        f"keras-gemma: the prompt is {tokens} tokens (with <bos>), which leaves no room in "
        f"--max-length 2: it counts the prompt and the reply; pass --max-length {tokens + 64} "
        "or more, or shorten the prompt"
    ]


def test_a_reader_that_stops_early_is_not_an_error(preset_dir):
    env = {**os.environ, "KERAS_BACKEND": keras.config.backend()}
    generate = [sys.executable, "-m", "keras_gemma", "generate", "hello", "--preset", preset_dir, "--max-length", "40"]
    done = subprocess.run(
        f"{shlex.join(generate)} | head -c 1", shell=True, capture_output=True, text=True, env=env, timeout=600,
        executable="/bin/bash",
    )
    assert done.stdout == "h"
    assert "Broken pipe" not in done.stderr and "Error" not in done.stderr, done.stderr[-2000:]


def test_loading_hides_native_logs_but_not_python_output(capfd):
    """While a model loads, the native libraries' start-up lines are hidden,
    but what Python prints to stderr (a first download's progress bar,
    warnings) shows."""
    import os
    import sys

    from keras_gemma.cli import _native_logs_silenced

    with _native_logs_silenced():
        os.write(2, b"native log line\n")
        print("downloading: 40%", file=sys.stderr)
    print("after", file=sys.stderr)
    err = capfd.readouterr().err
    assert "native log line" not in err
    assert "downloading: 40%" in err and "after" in err


def test_help_is_useful_per_command():
    for command in ("generate", "chat", "convert"):
        done = cli(command, "--help")
        assert done.returncode == 0
        assert "--" in done.stdout and command in done.stdout


def test_convert_to_transformers_and_refuse_existing(preset_dir, tmp_path):
    import numpy as np
    import transformers

    destination = tmp_path / "hf"
    done = cli("convert", preset_dir, str(destination), "--to", "transformers")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr == ""  # No native log lines (TensorFlow, XLA, SentencePiece).
    model = transformers.AutoModelForCausalLM.from_pretrained(str(destination))
    token_ids = helpers.random_token_ids(model.config.vocab_size, (1, 8))
    ours = keras_gemma.GemmaCausalLM.from_preset(preset_dir)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(ours({"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)})),
        helpers.hf_logits(model, token_ids), atol=1e-4, rtol=0,
    )
    again = cli("convert", preset_dir, str(destination))
    assert again.returncode != 0 and "already exists" in again.stderr
    # And back: stdout says what was written, nothing else (a progress bar
    # wrote its redraws there; it is for terminals, on stderr).
    back = cli("convert", str(destination), str(tmp_path / "back"))
    assert back.returncode == 0, back.stderr[-2000:]
    assert back.stdout == f"wrote {tmp_path / 'back'}\n" and back.stderr == ""


def test_convert_checks_the_destination_before_loading(monkeypatch, tmp_path):
    """A destination under a file fails at once, not after the import."""
    from keras_gemma.checkpoints import convert

    monkeypatch.setattr(convert, "load_for_conversion", lambda *a: pytest.fail("loaded"))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="a_file is not a writable directory"):
        convert.convert("any/source", str(tmp_path / "a_file" / "sub" / "preset"))
    with pytest.raises(ValueError, match=r"dtype must be one of float32, bfloat16, float16, got 'int8'; quantize"):
        convert.convert("any/source", str(tmp_path / "preset"), dtype="int8")
    # A dangling link: the final rename failed, after the whole load.
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="link already exists"):
        convert.convert("any/source", str(tmp_path / "link"))
    assert (tmp_path / "link").is_symlink()


@pytest.fixture(scope="module")
def quantized_preset_dir(preset_dir, tmp_path_factory):
    gemma_lm = keras_gemma.GemmaCausalLM.from_preset(preset_dir)
    gemma_lm.quantize("int8")
    path = tmp_path_factory.mktemp("cli") / "int8"
    gemma_lm.save_to_preset(str(path))
    return str(path)


def test_convert_refuses_what_the_config_rules_out_before_loading(
    quantized_preset_dir, spm_proto, vocabulary_size, monkeypatch, tmp_path
):
    """A quantized model to transformers (or with a new dtype), a backbone
    without a tokenizer to transformers, an architecture transformers
    cannot compute: refused from the preset's config, before the weights
    load (the export refused them only after the whole load)."""
    from keras_gemma.checkpoints import convert

    monkeypatch.setattr(convert, "load_for_conversion", lambda *a: pytest.fail("loaded"))
    destination = str(tmp_path / "out")
    with pytest.raises(ValueError, match=r"holds a quantized \(int8\) model.*cannot be converted --to transformers.*--to keras"):
        convert.convert(quantized_preset_dir, destination, to="transformers")
    with pytest.raises(ValueError, match=r"quantized \(int8\).*dtype 'bfloat16' \(--dtype\) cannot apply"):
        convert.convert(quantized_preset_dir, destination, dtype="bfloat16")

    backbone_only = str(tmp_path / "backbone_only")
    keras_gemma.GemmaBackbone(vocabulary_size=vocabulary_size, **helpers.TINY_MQA).save_to_preset(backbone_only)
    with pytest.raises(ValueError, match="holds no tokenizer .*Hugging Face directory needs one"):
        convert.convert(backbone_only, destination, to="transformers")

    # Soft-caps without sandwich norms: no transformers Gemma computes that.
    capped = str(tmp_path / "capped")
    backbone = keras_gemma.GemmaBackbone(
        vocabulary_size=vocabulary_size, attention_logit_soft_cap=50.0, **helpers.TINY_MQA
    )
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor(keras_gemma.GemmaTokenizer(proto=spm_proto))
    keras_gemma.GemmaCausalLM(backbone, preprocessor).save_to_preset(capped)
    with pytest.raises(ValueError, match="capped: This backbone cannot be exported .*attention_logit_soft_cap"):
        convert.convert(capped, destination, to="transformers")
    assert sorted(os.listdir(tmp_path)) == ["backbone_only", "capped"]


def test_convert_refuses_a_quantized_model_to_transformers_unread(quantized_preset_dir, tmp_path, capsys):
    """From the command line, in one line; the weights file is not read
    (here it is missing, which the load would have reported instead)."""
    import shutil

    source = tmp_path / "int8"
    shutil.copytree(quantized_preset_dir, source)
    (source / "model.weights.h5").unlink()
    assert main(["convert", str(source), str(tmp_path / "hf"), "--to", "transformers"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"keras-gemma: {source} holds a quantized (int8) model")
    assert len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["int8"]


def test_convert_a_backbone_saved_on_its_own(vocabulary_size, tmp_path):
    """A preset without a tokenizer converts to a Keras preset without one
    (it failed for the missing tokenizer once the weights had loaded)."""
    from keras_gemma.checkpoints.convert import convert

    backbone = keras_gemma.GemmaBackbone(vocabulary_size=vocabulary_size, **helpers.TINY_MQA)
    randomize_weights(backbone)
    backbone.save_to_preset(str(tmp_path / "backbone"))
    convert(str(tmp_path / "backbone"), str(tmp_path / "out"), dtype="bfloat16")
    converted = keras_gemma.GemmaBackbone.from_preset(str(tmp_path / "out"), dtype="float32")
    for ours, theirs in zip(backbone.weights, converted.weights):
        expected = keras.ops.cast(keras.ops.cast(ours, "bfloat16"), "float32")
        assert bool(keras.ops.all(keras.ops.equal(theirs, expected))), ours.path


def test_failed_conversion_leaves_nothing(tmp_path, capsys):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 20)
    destination = tmp_path / "out"
    assert main(["convert", str(broken), str(destination)]) == 1
    assert "broken.gguf" in capsys.readouterr().err
    assert not destination.exists()
    assert os.listdir(tmp_path) == ["broken.gguf"]


def test_lengths_past_the_trained_context_are_refused(preset_dir, monkeypatch, capsys):
    """Positions past the context the model was trained on degrade the text
    (a model from a path: after it loads). chat's replies end at the
    context, and a conversation that fills it ends the chat."""
    context = keras_gemma.GemmaBackbone.from_preset(preset_dir).context_length
    assert main(["generate", "hi", "--preset", preset_dir, "--max-length", str(context + 1)]) == 1
    assert f"--max-length {context + 1} is past the {context} tokens that {preset_dir} was trained on" in capsys.readouterr().err
    lengths = []

    def stream(gemma_lm, prompt, max_length, **kwargs):
        lengths.append(max_length)
        return ""

    monkeypatch.setattr(cli_module, "_stream", stream)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n" + "a " * context + "\n"))
    assert main(["chat", "--preset", preset_dir, "--max-new-tokens", str(context)]) == 1
    assert lengths == [context]  # The first reply: up to the context.
    message = f"tokens) leaves no room in the {context} tokens that {preset_dir} was trained on; start a new chat"
    assert message in capsys.readouterr().err


def test_chat_uses_the_template_and_ends_on_empty_line(preset_dir, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nhi again\n\n"))
    assert main(["chat", "--preset", preset_dir, "--max-new-tokens", "6"]) == 0
    done = capsys.readouterr()
    assert done.out.count("you> ") == 3 and done.out.count("gemma> ") == 2
    assert "is a base model, not instruction-tuned" in done.err
    # The reply equals greedy generation on the chat-formatted prompt, cut at
    # <end_of_turn> (a stop token in chat even for base presets).
    # The second turn (prefilled from where the first left the cache) too.
    gemma_lm = keras_gemma.GemmaCausalLM.from_preset(preset_dir)
    gemma_lm.preprocessor.stop_tokens = ["<eos>", "<end_of_turn>"]
    turns = []
    for text, printed in zip(["hello", "hi again"], done.out.split("gemma> ")[1:]):
        turns.append({"role": "user", "content": text})
        prompt = keras_gemma.format_chat(turns)
        prompt_length = len(gemma_lm.preprocessor.tokenizer(prompt)) + 1
        expected = gemma_lm.generate(prompt, max_length=prompt_length + 6)[len(prompt):]
        expected = expected.removesuffix("<end_of_turn>")
        assert printed.split("\nyou> ")[0] == expected
        turns.append({"role": "model", "content": expected})


def test_ctrl_c_in_chat_stops_the_reply_not_the_chat(preset_dir, monkeypatch, capsys):
    """Ctrl-C ended the session; now it drops that turn and the chat goes
    on. At the prompt (or in generate) it ends the command with status 130."""
    prompts, stream = [], cli_module._stream

    def interrupted_once(gemma_lm, prompt, *args, **kwargs):
        prompts.append(prompt)
        if len(prompts) == 1:
            raise KeyboardInterrupt
        return stream(gemma_lm, prompt, *args, **kwargs)

    lines = iter(["hello", "hi again", ""])
    monkeypatch.setattr(cli_module, "_stream", interrupted_once)
    monkeypatch.setattr("builtins.input", lambda prompt: next(lines))
    assert cli_module.main(["chat", "--preset", preset_dir, "--max-new-tokens", "4"]) == 0
    assert "(stopped; this turn is forgotten)" in capsys.readouterr().err
    assert prompts == [
        keras_gemma.format_chat([{"role": "user", "content": "hello"}]),
        keras_gemma.format_chat([{"role": "user", "content": "hi again"}]),
    ]

    def ctrl_c(prompt):
        raise KeyboardInterrupt

    monkeypatch.setattr("builtins.input", ctrl_c)
    assert cli_module.main(["chat", "--preset", preset_dir]) == 130
    assert capsys.readouterr().err.strip().endswith("keras-gemma: interrupted")


def test_backend_flag_in_a_process_already_running_keras(preset_dir, capsys):
    """main() called from Python: --backend for another backend was ignored."""
    other = next(b for b in ("jax", "tensorflow", "torch") if b != keras.config.backend())
    assert main(["generate", "hi", "--preset", preset_dir, "--backend", other]) == 1
    assert f"--backend {other}, but this Python process already runs Keras on {keras.config.backend()}" in capsys.readouterr().err


def test_backend_follows_keras_json_unless_set(tmp_path):
    """The command chose JAX whenever $KERAS_BACKEND was unset, ignoring
    keras.json's backend. Now: --backend, else $KERAS_BACKEND, else
    keras.json's unless it is tensorflow (Keras writes its default there
    itself), else JAX; one keras_gemma does not run on is refused in one
    line. (The command fails at the empty prompt, before any model; it
    sets $KERAS_BACKEND, which Keras obeys: checked once by importing it.)"""
    import json

    (tmp_path / "keras.json").write_text(json.dumps({"backend": "torch"}))
    # The command, printing the backend it chose for Keras ($KERAS_BACKEND,
    # which Keras obeys), or with IMPORT_KERAS=1 the one Keras then runs on.
    script = tmp_path / "bin" / "keras-gemma"
    script.parent.mkdir()
    script.write_text(
        "import os\nfrom keras_gemma.cli import main\nstatus = main()\n"
        "if os.environ.get('IMPORT_KERAS'):\n    import keras\n"
        "    print(status, keras.config.backend())\n"
        "else:\n    print(status, os.environ.get('KERAS_BACKEND'))\n"
    )

    def backend(*options, **env_vars):
        env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
        env.update(KERAS_HOME=str(tmp_path), **env_vars)
        done = subprocess.run(
            [sys.executable, str(script), "generate", "", *options],
            capture_output=True, text=True, env=env, timeout=600,
        )
        assert done.stdout.split()[0] == "1" and "the prompt is empty" in done.stderr, done.stderr[-2000:]
        return done.stdout.split()[-1]

    assert backend(IMPORT_KERAS="1") == "torch"
    assert backend(KERAS_BACKEND="jax") == "jax"
    assert backend("--backend", "tensorflow", KERAS_BACKEND="jax") == "tensorflow"
    (tmp_path / "keras.json").write_text(json.dumps({"backend": "tensorflow"}))
    assert backend() == "jax"

    (tmp_path / "keras.json").write_text(json.dumps({"backend": "numpy"}))
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    done = subprocess.run(
        [sys.executable, "-m", "keras_gemma", "generate", "hi"],
        capture_output=True, text=True, env={**env, "KERAS_HOME": str(tmp_path)}, timeout=600,
    )
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"keras-gemma: the Keras backend is 'numpy' (from {tmp_path / 'keras.json'}), which "
        "keras_gemma does not run on; pass --backend jax or tensorflow or torch, or set KERAS_BACKEND"
    ]


def test_sampling_options_are_seeded_and_used(preset_dir, capsys):
    """`--sampler top_k --seed N` (in this process: the CLI's own code):
    the same seed gives the same text, and the sampler is not greedy."""
    def run(*options):
        assert main(["generate", "hello", "--preset", preset_dir, "--max-length", "16", *options]) == 0
        return capsys.readouterr().out

    sampled = run("--sampler", "top_k", "--top-k", "50", "--temperature", "2.0", "--seed", "1")
    assert run("--sampler", "top_k", "--top-k", "50", "--temperature", "2.0", "--seed", "1") == sampled
    other_seeds = {run("--sampler", "top_k", "--top-k", "50", "--temperature", "2.0", "--seed", str(s)) for s in (2, 3)}
    greedy = run()
    assert greedy.strip() == keras_gemma.GemmaCausalLM.from_preset(preset_dir).generate("hello", max_length=16).strip()
    assert len(other_seeds | {sampled, greedy}) > 1


def test_text_that_is_not_utf8_in_chat_is_refused_and_the_chat_goes_on(preset_dir, monkeypatch, capsys):
    """A line of Latin-1 bytes failed in the tokenizer with a Keras error
    after the model had loaded, and ended the chat. Under locales such as
    en_US.UTF-8 Python's stdin is strict (only C/POSIX get surrogates):
    the line raised UnicodeDecodeError at input() and ended the chat."""
    strict_stdin = io.TextIOWrapper(io.BytesIO(b"caf\xe9\nhello\n\n"), encoding="utf-8", errors="strict")
    monkeypatch.setattr("sys.stdin", strict_stdin)
    assert main(["chat", "--preset", preset_dir, "--max-new-tokens", "4"]) == 0
    done = capsys.readouterr()
    assert "keras-gemma: the text is not valid UTF-8 (byte 0xe9 at position 3)" in done.err
    assert done.out.count("gemma> ") == 1  # The reply to "hello".


def test_generate_reads_stdin_that_is_not_utf8_into_one_line_of_error(monkeypatch, capsys):
    strict_stdin = io.TextIOWrapper(io.BytesIO(b"caf\xe9\n"), encoding="utf-8", errors="strict")
    monkeypatch.setattr("sys.stdin", strict_stdin)
    assert main(["generate"]) == 1
    assert "the text is not valid UTF-8 (byte 0xe9 at position 3); convert it first" in capsys.readouterr().err


def test_chat_system_text_that_is_not_utf8_is_refused_before_loading(monkeypatch, capsys):
    """It failed in the tokenizer with a Keras error dump, after loading
    and the user's first line."""
    monkeypatch.setattr(cli_module, "_load", lambda args: pytest.fail("loaded the model"))
    assert main(["chat", "--system", "caf\udce9"]) == 1
    assert "the text is not valid UTF-8 (byte 0xe9 at position 3)" in capsys.readouterr().err


def test_chat_ends_its_prompt_line_at_end_of_input(preset_dir, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["chat", "--preset", preset_dir]) == 0
    assert capsys.readouterr().out == "you> \n"


def test_convert_stopped_by_sigterm_leaves_nothing(preset_dir, tmp_path, monkeypatch):
    """`timeout` or `kill` left the half-written hidden directory behind;
    SIGTERM now ends the conversion as Ctrl-C does."""
    import signal
    import time

    def terminated_while_saving(self, preset_dir, **kwargs):
        open(os.path.join(preset_dir, "config.json"), "w").close()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # Python runs the handler at the next instruction.

    monkeypatch.setattr(keras_gemma.GemmaCausalLM, "save_to_preset", terminated_while_saving)
    previous = signal.getsignal(signal.SIGTERM)
    assert main(["convert", preset_dir, str(tmp_path / "out")]) == 130
    assert os.listdir(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) is previous


def test_version():
    done = cli("--version")
    assert done.returncode == 0
    assert done.stdout.startswith("keras-gemma ") and len(done.stdout.split()) == 2


def test_main_called_after_stdin_was_read(monkeypatch, capsys):
    """Python refuses to reconfigure a text stream already read from: every
    command failed with that message when called from Python after a read."""
    stdin = io.TextIOWrapper(io.BytesIO(b"first line\n"), encoding="utf-8")
    stdin.readline()
    monkeypatch.setattr("sys.stdin", stdin)
    assert main(["chat", "--system", "caf\udce9"]) == 1
    assert "the text is not valid UTF-8" in capsys.readouterr().err
