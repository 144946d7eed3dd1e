"""Writes leave the finished result or nothing (`keras_gemma/staging.py`),
with the permissions any new file or directory gets."""

import builtins
import errno
import os
import pathlib
import stat
import subprocess
import sys

import pytest

from keras_gemma.staging import staged_directory
from keras_gemma.staging import staged_file
from keras_gemma.staging import _HOST
from keras_gemma.staging import staged_preset


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def write_files(root, files):
    """Write `{relative path: text}` under `root`."""
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_staged_directory_becomes_the_destination_with_ordinary_permissions(tmp_path):
    ordinary = tmp_path / "ordinary"
    ordinary.mkdir()
    with staged_directory(tmp_path / "out") as staging:
        assert not (tmp_path / "out").exists()  # Nothing there until it is complete.
        (open(os.path.join(staging, "weights"), "w")).close()
    assert sorted(os.listdir(tmp_path)) == ["ordinary", "out"]
    assert os.listdir(tmp_path / "out") == ["weights"]
    # Not private to its owner (as tempfile.mkdtemp would make it).
    assert mode(tmp_path / "out") == mode(ordinary)


def test_staged_directory_replaces_an_empty_directory_and_refuses_a_full_one(tmp_path):
    (tmp_path / "empty").mkdir()
    with staged_directory(tmp_path / "empty") as staging:
        (open(os.path.join(staging, "a"), "w")).close()
    assert os.listdir(tmp_path / "empty") == ["a"]
    with pytest.raises(OSError):
        with staged_directory(tmp_path / "empty") as staging:
            (open(os.path.join(staging, "b"), "w")).close()
    assert os.listdir(tmp_path / "empty") == ["a"]
    assert os.listdir(tmp_path) == ["empty"]


def test_failed_staged_writes_leave_what_was_there(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with staged_directory(tmp_path / "out") as staging:
            (open(os.path.join(staging, "half"), "w")).close()
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []

    path = tmp_path / "adapters.safetensors"
    path.write_text("old")
    with pytest.raises(OSError, match="disk full"):
        with staged_file(path) as partial:
            with open(partial, "w") as f:
                f.write("new, half")
            raise OSError("disk full")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["adapters.safetensors"]
    with staged_file(path) as partial:
        with open(partial, "w") as f:
            f.write("new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["adapters.safetensors"]


def test_staged_file_creates_missing_parent_directories(tmp_path):
    """As `save_to_preset` does: `save_lora_weights("new_dir/a.lora.h5")`."""
    path = tmp_path / "new" / "dir" / "adapters.safetensors"
    with staged_file(path) as partial:
        with open(partial, "w") as f:
            f.write("new")
    assert path.read_text() == "new" and os.listdir(path.parent) == ["adapters.safetensors"]


def test_files_written_private_get_ordinary_permissions(tmp_path):
    """safetensors' save_file writes 0600: exports and adapters could not be
    read by anyone but their owner."""
    ordinary = tmp_path / "ordinary"
    ordinary.write_text("")
    with staged_directory(tmp_path / "export") as staging:
        private = os.path.join(staging, "sub", "model.safetensors")
        os.makedirs(os.path.dirname(private))
        open(private, "w").close()
        os.chmod(private, 0o600)
    with staged_file(tmp_path / "adapter.safetensors") as partial:
        open(partial, "w").close()
        os.chmod(partial, 0o600)
    assert mode(tmp_path / "export" / "sub" / "model.safetensors") == mode(ordinary)
    assert mode(tmp_path / "adapter.safetensors") == mode(ordinary)


@pytest.mark.parametrize("stage", [staged_directory, staged_file, staged_preset])
def test_a_failed_write_removes_the_parent_directories_it_made(tmp_path, stage):
    (tmp_path / "kept").mkdir()
    with pytest.raises(ValueError, match="refused"):
        with stage(tmp_path / "kept" / "new" / "deeper" / "out"):
            raise ValueError("refused")
    assert os.listdir(tmp_path / "kept") == []
    with stage(tmp_path / "kept" / "new" / "out") as partial:
        open(os.path.join(partial, "a") if os.path.isdir(partial) else partial, "w").close()
    assert os.listdir(tmp_path / "kept" / "new") == ["out"]


def test_a_preset_saved_over_a_mount_point_moves_its_files_within_it(tmp_path, monkeypatch):
    """A preset directory that is a mount point (a volume, a second disk):
    renames from beside it cross file systems and fail, which left the old
    preset without its assets/ (its tokenizer)."""
    preset = tmp_path / "preset"
    write_files(preset, {"assets/vocabulary.spm": "old", "config.json": '{"registered_name": "old"}', "model.weights.h5": "old"})
    rename = os.replace

    def within_the_mount(source, target):
        if not os.path.abspath(source).startswith(str(preset) + os.sep):
            raise OSError(18, "Invalid cross-device link")
        rename(source, target)

    monkeypatch.setattr(os, "replace", within_the_mount)
    with staged_preset(preset) as staging:
        os.mkdir(os.path.join(staging, "assets"))
        for name in ("assets/vocabulary.spm", "model.weights.h5"):
            with open(os.path.join(staging, name), "w") as f:
                f.write("new")
    assert sorted(os.listdir(preset)) == ["assets", "config.json", "model.weights.h5"]
    assert (preset / "assets" / "vocabulary.spm").read_text() == "new"
    assert (preset / "model.weights.h5").read_text() == "new"


def test_an_interrupted_tokenizer_save_leaves_the_preset_loadable(spm_proto, vocabulary_size, tmp_path, monkeypatch):
    """Tokenizers and preprocessors saved with KerasHub's save_to_preset
    wrote in place: a full disk left a truncated vocabulary."""
    import keras_hub

    import keras_gemma
    from tests import helpers

    tokenizer = keras_gemma.GemmaTokenizer(proto=spm_proto)
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor(tokenizer)
    backbone = keras_gemma.GemmaBackbone(vocabulary_size=vocabulary_size, **helpers.TINY_MQA)
    preset = tmp_path / "preset"
    keras_gemma.GemmaCausalLM(backbone, preprocessor).save_to_preset(str(preset))
    for saved in (tokenizer, preprocessor):
        saved.save_to_preset(str(preset))  # Over the model's: the usual way.
        save_assets = keras_hub.tokenizers.SentencePieceTokenizer.save_assets

        def disk_full(self, directory):
            save_assets(self, directory)
            with open(os.path.join(directory, "vocabulary.spm"), "r+b") as f:
                f.truncate(100)
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(keras_hub.tokenizers.SentencePieceTokenizer, "save_assets", disk_full)
        with pytest.raises(OSError, match="No space left"):
            saved.save_to_preset(str(preset))
        monkeypatch.undo()
        restored = keras_gemma.GemmaTokenizer.from_preset(str(preset))
        assert restored.vocabulary_size() == tokenizer.vocabulary_size()
        assert not [name for name in os.listdir(preset) if name.endswith(".partial")]
    # The model's weights stay (a tokenizer's save writes none to replace).
    keras_gemma.GemmaCausalLM.from_preset(str(preset))


@pytest.mark.parametrize("failing_move", [1, 3, 4, 6])  # Aside: 3 moves, in: 4.
def test_a_preset_save_that_fails_while_moving_in_restores_the_old_preset(tmp_path, monkeypatch, failing_move):
    """The old assets/ and stale weights were deleted before the new files
    moved in, one by one: a failed rename midway left half of each preset."""
    preset = tmp_path / "preset"
    old = {"config.json": '{"registered_name": "old"}', "model.weights.h5": "old", "assets/vocabulary.spm": "old", "notes.txt": "mine"}
    write_files(preset, old)
    moves, rename = [], os.replace

    def failing(source, target):
        moves.append(source)
        if len(moves) == failing_move:
            raise OSError(5, "Input/output error")
        rename(source, target)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="Input/output error"):
        with staged_preset(preset) as staging:
            os.mkdir(os.path.join(staging, "assets"))
            for name in ("config.json", "model_00000.weights.h5", "model.weights.json", "assets/vocabulary.spm"):
                with open(os.path.join(staging, name), "w") as f:
                    f.write("new")
    assert len(moves) >= failing_move
    assert sorted(os.listdir(preset)) == ["assets", "config.json", "model.weights.h5", "notes.txt"]  # Nothing aside.
    contents = {
        os.path.relpath(os.path.join(parent, name), preset): open(os.path.join(parent, name)).read()
        for parent, _, names in os.walk(preset) for name in names
    }
    assert contents == old


def test_a_preset_is_not_saved_over_another_format(tmp_path):
    """save_to_preset into a Hugging Face checkpoint directory replaced its
    config.json and left its weights beside the Keras ones."""
    checkpoint = tmp_path / "hf"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text('{"model_type": "gemma"}')
    (tmp_path / "a_file").write_text("mine")
    for destination, message in ((checkpoint, "is not a Keras preset's config"), (tmp_path / "a_file", "is a file")):
        with pytest.raises(FileExistsError, match=message):
            with staged_preset(destination) as staging:
                (open(os.path.join(staging, "config.json"), "w")).close()
    assert os.listdir(checkpoint) == ["config.json"]
    assert (checkpoint / "config.json").read_text() == '{"model_type": "gemma"}'
    assert (tmp_path / "a_file").read_text() == "mine"


def test_a_preset_is_not_saved_over_a_projects_own_files(tmp_path, spm_proto, vocabulary_size):
    """A save into a directory that is not a preset replaced its `assets/`
    and metadata.json (a project's, say) without a word; a directory with
    other files only, or a preset's own, are saved to."""
    import keras_gemma
    from tests import helpers

    project = tmp_path / "project"
    mine = {"assets/images/logo.png": "png", "metadata.json": '{"my": "metadata"}', "README.md": "mine"}
    write_files(project, mine)
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor(keras_gemma.GemmaTokenizer(proto=spm_proto))
    gemma_lm = keras_gemma.GemmaCausalLM(
        keras_gemma.GemmaBackbone(vocabulary_size=vocabulary_size, **helpers.TINY_MQA), preprocessor
    )
    with pytest.raises(FileExistsError, match=r"project is not a Keras preset, and saving one there would replace its assets, metadata.json\."):
        gemma_lm.save_to_preset(str(project))
    assert sorted(os.listdir(project)) == ["README.md", "assets", "metadata.json"]
    assert (project / "metadata.json").read_text() == mine["metadata.json"]
    assert (project / "assets/images/logo.png").read_text() == "png"

    write_files(tmp_path / "notes", {"README.md": "mine"})
    gemma_lm.save_to_preset(str(tmp_path / "notes"))  # Other files only.
    write_files(tmp_path / "notes", {"assets/my_notes.txt": "mine too"})
    gemma_lm.save_to_preset(str(tmp_path / "notes"))  # A preset's own.
    assert (tmp_path / "notes/README.md").read_text() == "mine"
    assert (tmp_path / "notes/assets/my_notes.txt").read_text() == "mine too"  # KerasHub keeps it too.
    assert keras_gemma.GemmaCausalLM.from_preset(str(tmp_path / "notes")).generate("hello", max_length=8)


def test_old_files_that_cannot_be_put_back_stay_aside_and_the_error_says_where(tmp_path, monkeypatch):
    preset = tmp_path / "preset"
    write_files(preset, {"assets/vocabulary.spm": "old", "config.json": '{"registered_name": "old"}'})
    rename = os.replace

    def failing(source, target):
        # Moving the new config in fails, and so does putting the old assets back.
        if ".preset." in source or (".replaced." in source and source.endswith("vocabulary.spm")):
            raise OSError(5, "Input/output error")
        rename(source, target)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="Input/output error") as raised:
        with staged_preset(preset) as staging:
            os.mkdir(os.path.join(staging, "assets"))
            for name in ("assets/vocabulary.spm", "config.json"):
                (open(os.path.join(staging, name), "w")).close()
    aside = [name for name in os.listdir(preset) if name.startswith(".replaced.")]
    assert len(aside) == 1 and os.listdir(preset / aside[0]) == ["assets"]
    assert (preset / aside[0] / "assets" / "vocabulary.spm").read_text() == "old"  # Not deleted.
    assert any(aside[0] in note for note in raised.value.__notes__)


def test_what_a_killed_write_left_is_removed_by_the_next_write(tmp_path):
    """A save killed outright (SIGKILL, out of memory) left its hidden
    staging directory, with the new weights, in the preset for good."""
    preset = tmp_path / "preset"
    write_files(preset, {"config.json": '{"registered_name": "old"}', "model.weights.h5": "old"})
    killed = subprocess.Popen([sys.executable, "-c", "pass"])
    killed.wait()  # A process id that no longer runs.
    dead = preset / f".preset.{_HOST}-{killed.pid}-0123abcd.partial"
    running = preset / f".preset.{_HOST}-{os.getpid()}-4567cdef.partial"  # A save under way.
    elsewhere = preset / f".preset.{_HOST}x-{killed.pid}-0123abcd.partial"  # Another machine's.
    aside = preset / f".replaced.{_HOST}-{killed.pid}-89abcdef.aside"  # May hold old files.
    for staging in (dead, running, elsewhere, aside):
        write_files(staging, {"model.weights.h5": "new"})
    with staged_preset(preset) as staging:
        write_files(pathlib.Path(staging), {"config.json": '{"registered_name": "new"}'})
    assert not dead.exists()
    assert running.exists() and elsewhere.exists() and aside.exists()
    # A file's partial copy (the cached GGUF's, an adapter's) too.
    dead_file = tmp_path / f".model.gguf.{_HOST}-{killed.pid}-0123abcd.partial"
    dead_file.write_text("half")
    with staged_file(tmp_path / "model.gguf") as partial:
        pathlib.Path(partial).write_text("whole")
    assert not dead_file.exists() and (tmp_path / "model.gguf").read_text() == "whole"
    assert (preset / "config.json").read_text() == '{"registered_name": "new"}'


def deny_writes_as_for_root(directory, monkeypatch):
    """Root writes in a read-only directory: for it, refuse what the kernel
    would refuse another user there (new directories and files)."""
    real_mkdir, real_open = os.mkdir, builtins.open

    def denied(path):
        return os.path.abspath(os.fspath(path)).startswith(str(directory) + os.sep)

    def mkdir(path, *args, **kwargs):
        if denied(path):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_mkdir(path, *args, **kwargs)

    def open_(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and denied(file) and set(mode) & set("wxa+"):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(builtins, "open", open_)


def test_a_read_only_destination_is_named_in_the_error(tmp_path, monkeypatch):
    """The error named the hidden `.partial` name of the write that failed
    first, not the destination that was passed."""
    import keras_gemma
    from tests import helpers

    def write_file(path):
        with staged_file(path) as partial:
            open(partial, "w").close()

    backbone = keras_gemma.GemmaBackbone(vocabulary_size=64, **helpers.TINY_MQA)
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    if not hasattr(os, "geteuid") or os.geteuid() == 0:
        deny_writes_as_for_root(read_only, monkeypatch)
    try:
        for destination, save in [
            (read_only, backbone.save_to_preset),  # Staged inside it.
            (read_only / "new", backbone.save_to_preset),  # Staged beside it.
            (read_only / "adapters.safetensors", write_file),
        ]:
            with pytest.raises(PermissionError) as raised:
                save(str(destination))
            assert str(raised.value).startswith(f"[Errno 13] {destination} is not writable"), raised.value
            assert isinstance(raised.value.__cause__, PermissionError)
            assert os.listdir(read_only) == []
    finally:
        read_only.chmod(0o755)  # For pytest to remove it.
