"""Writes that leave either the finished result or nothing: everything is
written under a temporary name beside the destination and renamed into
place at the end (the rename is atomic within one file system). A failure
or Ctrl-C removes the partial write and leaves what was there before."""

import contextlib
import functools
import json
import os
import re
import shutil
import uuid


def _partial_name(destination):
    parent, name = os.path.split(os.path.abspath(os.fspath(destination)))
    return os.path.join(parent, f".{name}.{uuid.uuid4().hex[:8]}.partial")


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
    with _parents_made_for(path), _staged_file(path) as partial:
        yield partial


@contextlib.contextmanager
def _staged_file(path):
    partial = _partial_name(path)
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
    return _staged_directory(directory, _rename_into_place)


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
    tokenizer saved there on its own stays). A failure leaves `directory`
    as it was. An existing `directory` is staged in itself, so that the
    files move in within one file system even when it is a mount point (a
    volume, a second disk): a rename across file systems fails, and by then
    the old `assets/` was gone. A save that `writes_weights=False` (a
    tokenizer's, a preprocessor's) removes no weights."""
    _check_not_another_format(directory)
    move_in = functools.partial(_move_preset_files_in, writes_weights=writes_weights)
    return _staged_directory(directory, move_in, inside=True)


def _check_not_another_format(directory):
    """Refuse a directory whose config.json is not a Keras preset's (a
    Hugging Face checkpoint, a project's settings): a save would replace it."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise FileExistsError(f"{directory} is a file; save the preset to a directory")
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        return
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        config = None
    if not (isinstance(config, dict) and "registered_name" in config):
        raise FileExistsError(
            f"{config_path} is not a Keras preset's config (a Hugging Face checkpoint's, "
            "or another file); saving a preset there would replace it. Save to a new "
            "directory, or to an existing Keras preset's to replace that preset."
        )


def _move_preset_files_in(staging, directory, writes_weights):
    """Move the entries a save replaces or removes aside (into a directory
    within `directory`: same file system), then the new ones in; a failure
    midway moves everything back, so the old preset stays whole."""
    created = not os.path.isdir(directory)
    os.makedirs(directory, exist_ok=True)
    written = os.listdir(staging)
    replaced = [
        name for name in os.listdir(directory)
        if os.path.abspath(os.path.join(directory, name)) != staging
        and (name in written or (writes_weights and _WEIGHTS_FILE.fullmatch(name)))
    ]
    aside = _partial_name(os.path.join(directory, "replaced"))
    os.mkdir(aside)
    moved_aside, moved_in = [], []
    try:
        for name in replaced:
            os.replace(os.path.join(directory, name), os.path.join(aside, name))
            moved_aside.append(name)
        for name in written:
            os.replace(os.path.join(staging, name), os.path.join(directory, name))
            moved_in.append(name)
    except BaseException as error:
        for source, target, names in ((directory, staging, moved_in), (aside, directory, moved_aside)):
            for name in names:
                with contextlib.suppress(OSError):  # Keep putting back the rest.
                    os.replace(os.path.join(source, name), os.path.join(target, name))
        with contextlib.suppress(OSError):
            os.rmdir(aside)  # Only if all went back: never delete the old files.
            if created:
                os.rmdir(directory)
        if os.path.exists(aside):
            error.add_note(f"The previous preset's files that could not be put back are in {aside}.")
        raise
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def _staged_directory(directory, move_in, inside=False):
    """A new directory beside `directory` (with `inside`, in it when it
    exists), given ordinary permissions and handed to `move_in(staging,
    directory)` when the block succeeds."""
    with _parents_made_for(directory):
        staging = _partial_name(directory)
        if inside and os.path.isdir(directory):
            staging = os.path.join(os.path.abspath(os.fspath(directory)), os.path.basename(staging))
        os.mkdir(staging)
        try:
            yield staging
            for parent, _, files in os.walk(staging):
                for name in files:
                    _with_ordinary_permissions(os.path.join(parent, name))
            move_in(staging, directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
