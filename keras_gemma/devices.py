"""Where the Keras backend computes."""

import keras


def computes_on_gpu():
    """Whether the Keras backend computes on a GPU (its default device)."""
    backend = keras.config.backend()
    if backend == "jax":
        import jax

        return jax.default_backend() == "gpu"
    if backend == "torch":
        import torch

        return torch.cuda.is_available()
    if backend == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_logical_devices("GPU"))
    return False
