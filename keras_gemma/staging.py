"""Writes that leave either the finished result or nothing: everything is
written under a temporary name beside the destination and renamed into
place at the end (the rename is atomic within one file system). A failure
or Ctrl-C removes the partial write and leaves what was there before."""

import contextlib
import errno
import functools
import json
import os
import re
import shutil
import socket
import uuid


def _destination(path):
    """The absolute path to write, `~` expanded (as `from_preset` reads
    it): a literal `./~` directory invites `rm -rf ~`."""
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


def check_free_space(destination, needed_bytes, what):
    """Refuse a write that would not fit on the destination's disk, before
    writing: on a full disk, h5py (3.14, HDF5 1.14.6) crashed the process
    with a segmentation fault instead of raising (a notebook's fine-tuned
    model lost with it)."""
    parent = _destination(destination)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    free = shutil.disk_usage(parent).free
    if needed_bytes > free:
        raise OSError(
            errno.ENOSPC,
            f"Not enough disk space to save {what} to {os.fspath(destination)}: it needs about "
            f"{needed_bytes / 1e9:.2f} GB and {free / 1e9:.2f} GB is free there. Free some "
            "space or save elsewhere; nothing was written.",
        )


@contextlib.contextmanager
def _not_writable_named(destination):
    """A permission error in the block (a read-only directory) names the
    destination the caller passed, not the hidden partial name beside it
    that failed first."""
    try:
        yield
    except PermissionError as error:
        raise PermissionError(
            error.errno, f"{destination} is not writable (permission denied); nothing was written."
        ) from error


def _partial_name(destination, suffix=".partial"):
    """A hidden name beside `destination` that names this machine and
    process, so that a later save can tell a killed process' leftovers from
    a save under way."""
    parent, name = os.path.split(os.path.abspath(os.fspath(destination)))
    return os.path.join(parent, f".{name}.{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")


_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def _remove_dead_stagings(destination, inside=False):
    """Remove the partial writes of `destination` (beside it, or with
    `inside` in it) that a process killed on this machine left (SIGKILL,
    out of memory: no `finally` ran), e.g. 270 MB of gemma3_270m's weights
    in its preset, or a 253 MB GGUF in the cache, that no later write
    removed. Only new files are in them; a save's aside directory
    (`.aside`), which may hold the old preset's files, is kept. (Not on
    Windows, where `os.kill` cannot ask whether a process runs.)"""
    parent, name = os.path.split(os.path.abspath(os.fspath(destination)))
    directory = os.path.join(parent, name) if inside else parent
    if os.name == "nt" or not os.path.isdir(directory):
        return
    pattern = re.compile(rf"\.{re.escape(name)}\.{_HOST}-(\d+)-[0-9a-f]{{8}}\.partial")
    for entry in os.listdir(directory):
        match = pattern.fullmatch(entry)
        if match and not _process_runs(int(match.group(1))):
            path = os.path.join(directory, entry)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.remove(path)


def _process_runs(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # Another user's process (PermissionError): it runs.
        pass
    return True


def _with_ordinary_permissions(path):
    """Give a file the permissions of any new file (0666 less the umask):
    safetensors' `save_file` makes its files private to their owner, so a
    shared export or adapter could not be read by anyone else."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


@contextlib.contextmanager
def _parents_made_for(path):
    """Create the missing parent directories of `path`; a failure in the
    block removes them again (if still empty)."""
    missing = []
    parent = os.path.dirname(os.path.abspath(os.fspath(path)))
    while not os.path.exists(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    with _not_writable_named(path):
        os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    try:
        yield
    except BaseException:
        for directory in missing:  # Deepest first.
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        raise


@contextlib.contextmanager
def staged_file(path):
    """Yield a temporary path to write; it replaces `path` when the block
    ends without an error. Missing parent directories are created (and
    removed again on failure)."""
    path = _destination(path)
    with _parents_made_for(path), _staged_file(path) as partial:
        yield partial


@contextlib.contextmanager
def _staged_file(path):
    _remove_dead_stagings(path)
    partial = _partial_name(path)
    with _not_writable_named(path):
        open(partial, "x").close()  # A read-only directory fails here, not in the caller's writer.
        os.remove(partial)
    try:
        yield partial
        _with_ordinary_permissions(partial)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def staged_directory(directory):
    """Yield a new empty directory to fill; it becomes `directory` (which
    must not exist, or be empty) when the block ends without an error.
    Created with `os.mkdir`, so it has the permissions of any new directory
    (`tempfile.mkdtemp` would make it private to its owner), and so do the
    files written in it. Missing parents are removed again on failure."""
    return _staged_directory(_destination(directory), _rename_into_place)


def _rename_into_place(staging, directory):
    if os.path.isdir(directory) and not os.listdir(directory):
        os.rmdir(directory)
    os.replace(staging, directory)


# A Keras preset's weights: one file, or an index and its shards.
_WEIGHTS_FILE = re.compile(r"model\.weights\.(h5|json)|model_\d+\.weights\.h5")


def staged_preset(directory, writes_weights=True):
    """Yield a new empty directory to save a preset into; when the block
    ends without an error its files replace those in `directory` (created
    if missing). Weights of an earlier save that the new one does not write
    (a single file where shards are now, or the reverse) are removed, so
    they cannot be loaded in its place; other files are left alone (a
    tokenizer saved there on its own stays, and so do files of the user's
    in its `assets/`). A directory that is not a Keras preset but holds
    files a preset's save would replace (its own `assets/`, say) is
    refused. A failure leaves `directory` as it was. An existing
    `directory` is staged in itself, so that the files move in within one
    file system even when it is a mount point (a volume, a second disk): a
    rename across file systems fails, and by then the old `assets/` was
    gone. A save that `writes_weights=False` (a
    tokenizer's, a preprocessor's) removes no weights."""
    directory = _destination(directory)
    _check_not_another_format(directory)
    move_in = functools.partial(_move_preset_files_in, writes_weights=writes_weights)
    return _staged_directory(directory, move_in, inside=True)


# What a Keras preset's save writes besides its weights (KerasHub's names).
_PRESET_ENTRIES = ("assets", "config.json", "metadata.json", "preprocessor.json", "task.json", "tokenizer.json")


def _check_not_another_format(directory):
    """Refuse a directory whose files a save would replace but that is not
    a Keras preset: a config.json that is not a Keras preset's (a Hugging
    Face checkpoint, a project's settings), or a project's own `assets/` or
    metadata.json (they were replaced without a word)."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise FileExistsError(f"{directory} is a file; save the preset to a directory")
    if not os.path.isdir(directory):
        return
    config_path = os.path.join(directory, "config.json")
    if os.path.isfile(config_path) and "registered_name" not in _json_object(config_path):
        raise FileExistsError(
            f"{config_path} is not a Keras preset's config (a Hugging Face checkpoint's, "
            "or another file); saving a preset there would replace it. Save to a new "
            "directory, or to an existing Keras preset's to replace that preset."
        )
    clashes = [
        name for name in sorted(os.listdir(directory))
        if name in _PRESET_ENTRIES or _WEIGHTS_FILE.fullmatch(name)
    ]
    if clashes and not _is_keras_preset(directory):
        raise FileExistsError(
            f"{directory} is not a Keras preset, and saving one there would replace its "
            f"{', '.join(clashes)}. Save to a new or empty directory, or to an existing "
            "Keras preset's to replace that preset."
        )


def _is_keras_preset(directory):
    """Whether a Keras preset (a model's, or a tokenizer's alone) was saved
    in `directory`: its configs name their Keras class."""
    for name in ("config.json", "tokenizer.json", "preprocessor.json", "task.json"):
        if "registered_name" in _json_object(os.path.join(directory, name)):
            return True
    return "keras_version" in _json_object(os.path.join(directory, "metadata.json"))


def _json_object(path):
    """The JSON object in the file at `path`, or {} (no file, not JSON)."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _move_preset_files_in(staging, directory, writes_weights):
    """Move the entries a save replaces or removes aside (into a directory
    within `directory`: same file system), then the new ones in; a failure
    midway moves everything back, so the old preset stays whole."""
    created = not os.path.isdir(directory)
    os.makedirs(directory, exist_ok=True)
    new, old = _replacements(staging, directory, writes_weights)
    aside = _partial_name(os.path.join(directory, "replaced"), suffix=".aside")
    os.mkdir(aside)
    moved_aside, moved_in = [], []
    try:
        for path in old:
            _move(path, directory, aside)
            moved_aside.append(path)
        for path in new:
            _move(path, staging, directory)
            moved_in.append(path)
    except BaseException as error:
        for source, target, paths in ((directory, staging, moved_in), (aside, directory, moved_aside)):
            for path in reversed(paths):
                with contextlib.suppress(OSError):  # Keep putting back the rest.
                    os.replace(os.path.join(source, path), os.path.join(target, path))
        _remove_empty_directories(aside)  # Never delete the old files.
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        if os.path.exists(aside):
            error.add_note(f"The previous preset's files that could not be put back are in {aside}.")
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _replacements(staging, directory, writes_weights, relative=""):
    """`(paths to move in, paths to move aside)`, relative to `staging` and
    `directory`. A directory both hold is merged entry by entry: files of
    the user's own in a preset's `assets/` stay (KerasHub's save keeps
    them). Weights of an earlier save that this one does not write go."""
    new, old = [], []
    written = sorted(os.listdir(os.path.join(staging, relative)))
    for name in written:
        path = os.path.join(relative, name)
        if os.path.isdir(os.path.join(staging, path)) and os.path.isdir(os.path.join(directory, path)):
            merged_new, merged_old = _replacements(staging, directory, False, path)
            new += merged_new
            old += merged_old
        else:
            new.append(path)
            if os.path.lexists(os.path.join(directory, path)):
                old.append(path)
    if writes_weights and not relative:
        old += [name for name in sorted(os.listdir(directory)) if _WEIGHTS_FILE.fullmatch(name) and name not in written]
    return new, old


def _move(path, source, target):
    os.makedirs(os.path.dirname(os.path.join(target, path)), exist_ok=True)
    os.replace(os.path.join(source, path), os.path.join(target, path))


def _remove_empty_directories(root):
    """Remove `root` and the directories in it that hold no file."""
    for parent, _, _ in sorted(os.walk(root), key=lambda entry: -len(entry[0])):
        with contextlib.suppress(OSError):
            os.rmdir(parent)


@contextlib.contextmanager
def _staged_directory(directory, move_in, inside=False):
    """A new directory beside `directory` (with `inside`, in it when it
    exists), given ordinary permissions and handed to `move_in(staging,
    directory)` when the block succeeds."""
    with _parents_made_for(directory):
        staging = _partial_name(directory)
        inside = inside and os.path.isdir(directory)
        _remove_dead_stagings(directory, inside=inside)
        if inside:
            staging = os.path.join(os.path.abspath(os.fspath(directory)), os.path.basename(staging))
        with _not_writable_named(directory):
            os.mkdir(staging)
        try:
            yield staging
            for parent, _, files in os.walk(staging):
                for name in files:
                    _with_ordinary_permissions(os.path.join(parent, name))
            move_in(staging, directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
