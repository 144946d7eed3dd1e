"""`keras-gemma convert`: any supported source to a Keras preset or to HF."""

import dataclasses
import os

from keras_gemma.staging import staged_directory

WEIGHT_DTYPES = ("float32", "bfloat16", "float16")


def _check_destination(destination):
    """Before the (long) load: `destination` is new and can be created."""
    if os.path.exists(destination):
        raise ValueError(
            f"{destination} already exists; choose a new directory (nothing "
            "is overwritten)."
        )
    ancestor = os.path.dirname(destination)
    while not os.path.exists(ancestor):  # Missing parents are created.
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor) or not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"Cannot create {destination}: {ancestor} is not a writable directory.")


def _load_with_progress(checkpoint, dtype):
    """Build the model from `checkpoint`, counting tensors on a progress bar
    as the importer reads them; the bar ends its line when the load ends."""
    import keras

    from keras_gemma.checkpoints.importer import build_causal_lm

    bar = keras.utils.Progbar(None, unit_name="tensor")
    read = 0
    get_tensor = checkpoint.get_tensor

    def counted(name):
        nonlocal read
        tensor = get_tensor(name)
        read += 1
        bar.update(read)
        return tensor

    gemma_lm = build_causal_lm(dataclasses.replace(checkpoint, get_tensor=counted), dtype)
    bar.update(read, finalize=True)
    return gemma_lm


def load_for_conversion(source, dtype=None):
    from keras_gemma.checkpoints import loading
    from keras_gemma.models.gemma_causal_lm import GemmaCausalLM

    checkpoint = loading.foreign_checkpoint(source)
    if checkpoint is not None:
        return _load_with_progress(checkpoint, dtype)
    return GemmaCausalLM.from_preset(source, **({"dtype": dtype} if dtype else {}))


def convert(source, destination, to="keras", dtype=None):
    """Write `source` to `destination` as a Keras preset (`to="keras"`) or
    a transformers directory (`to="transformers"`). A failed conversion
    leaves nothing at `destination`."""
    if to not in ("keras", "transformers"):
        raise ValueError(f"Unknown target format {to!r}; use 'keras' or 'transformers'.")
    if dtype not in (None, *WEIGHT_DTYPES):  # Before the (long) load.
        raise ValueError(
            f"dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {dtype!r}; quantize "
            "a loaded model with `quantize('int8')` and save it with save_to_preset."
        )
    destination = os.path.abspath(destination)
    _check_destination(destination)
    gemma_lm = load_for_conversion(source, dtype)
    if to == "transformers":
        from keras_gemma.checkpoints.hf import export_to_transformers

        return export_to_transformers(gemma_lm, destination)
    with staged_directory(destination) as staging:
        gemma_lm.save_to_preset(staging)
    return destination
