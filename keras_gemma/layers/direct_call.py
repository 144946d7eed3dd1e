"""Less Python around PyTorch's kernels: built layers called directly,
and Keras' helpers that Dynamo need not interpret."""

import contextlib
import functools

import keras
from keras.src import backend as keras_backend  # AutocastScope is not public API.


class DirectCall:
    """Mixin for layers whose `call` uses no Keras masks.

    On PyTorch, a built layer runs `call` (or `quantized_call`) directly
    instead of through Keras' `Layer.__call__` bookkeeping (argument
    checks, masks, name scopes, call contexts), keeping the parts of
    `__call__` that change the result: top-level tensor arguments cast to
    the compute dtype, and mixed precision's autocast scope. While
    `torch.compile`'s Dynamo traces, it interprets that bookkeeping
    bytecode by bytecode: about half the tracing time of a decoder layer
    (~4.5 s per layer on a 2-core CPU, per compiled shape). Eagerly (a
    prefill, scoring, eager LoRA), it is Python time between kernels:
    gemma3_270m's 32-token prefill took 168 ms through it, 135 without.

    Kept on `__call__`: symbolic calls (building a functional model), calls
    that leave out a `training` argument that `call` uses (or any quantized
    call: float8 updates its scales in training), so Keras resolves it from
    the outer call. Skipped: name scopes, torch module hooks, activity
    regularizers, distribution layouts, and recording `training` in the
    call context (so a sublayer that leaves `training` out must not use
    it; none here does).
    """

    call_uses_training = True  # False where `call` takes but ignores it.

    def __call__(self, *args, **kwargs):
        uses_training = self.call_uses_training or getattr(self, "quantization_mode", None)
        resolve_training = (
            uses_training and self._call_has_training_arg and "training" not in kwargs
        )
        symbolic = bool(args) and isinstance(args[0], keras.KerasTensor)
        if resolve_training or self._remat_mode or symbolic or not (self.built and skips_keras_call()):
            return super().__call__(*args, **kwargs)
        # Outer calls pass `training` to every layer; Keras drops it where
        # `call` does not take it.
        kwargs = {
            key: x for key, x in kwargs.items()
            if key not in self._call_context_args or key in self.call_signature_parameters
        }
        if self._convert_input_args:  # Top-level arguments: not the cache's tuples.
            def convert(x):
                return self.dtype_policy.convert_input(x, self.autocast, self.input_dtype)

            args = tuple(convert(x) for x in args)
            kwargs = {key: convert(x) for key, x in kwargs.items()}
        # As `Operation.__call__` picks it.
        call = self.call if getattr(self, "quantization_mode", None) is None else self.quantized_call
        with _autocast_scope(self):
            return call(*args, **kwargs)


def skips_keras_call():
    """Whether built `DirectCall` layers skip `Layer.__call__`: on PyTorch
    (JAX and TensorFlow trace it once per compiled function)."""
    return keras.config.backend() == "torch"


def dynamo_is_tracing():
    if keras.config.backend() != "torch":
        return False
    import torch

    return torch.compiler.is_compiling()


def tensorflow_is_tracing():
    if keras.config.backend() != "tensorflow":
        return False
    import tensorflow as tf

    return tf.inside_function()


def _autocast_scope(layer):
    """The scope `Layer.__call__` opens around `call` (Keras 3.15)."""
    current = keras_backend.get_autocast_scope()
    if current is not None:
        if not layer.autocast or not keras_backend.is_float_dtype(layer.compute_dtype):
            return keras_backend.AutocastScope(None)
        if current.dtype != layer.compute_dtype:
            return keras_backend.AutocastScope(layer.compute_dtype)
    elif layer.compute_dtype != layer.variable_dtype:
        return keras_backend.AutocastScope(layer.compute_dtype)
    return contextlib.nullcontext()


@functools.cache
def shorten_keras_tracing():
    """Tell Dynamo (PyTorch) what some of Keras' helpers compute, so that it
    does not interpret them bytecode by bytecode at every Keras op. Dynamo
    then traces gemma3_270m's decode step in about half the time (first
    `generate()` 44 -> 25 s on a 2-core CPU, with Inductor's cache warm).
    Eager calls are unaffected; the registrations are process-wide, once.

    - `any_symbolic_tensors`, which every `keras.ops` call runs over its
      arguments (flattening nested ones through torch's pytree), is False:
      KerasTensors exist only while Keras builds a functional model, never
      inside a `torch.compile` trace.
    - Dtype helpers are pure functions of their (constant) arguments:
      Dynamo calls them instead of tracing them.
    - Keras' `auto_name` (each operation made in a trace takes a unique
      name: `keras.ops.cond` makes one per call) runs as a constant, not
      traced: traced, its read of Keras' name counter became a guard, and
      the counter changes at every call: with `gradient_accumulation_steps`
      (one `cond` per update) the optimizer's update was compiled again at
      every step.
    """
    import torch
    from keras.src.backend.common import dtypes, keras_tensor, variables
    from keras.src.backend.torch import core
    from keras.src.utils import naming

    @torch.compiler.substitute_in_graph(naming.auto_name, can_constant_fold_through=True)
    def auto_name(prefix):  # Constant folding calls Keras' own with the constant prefix.
        return naming.to_snake_case(prefix)

    @torch.compiler.substitute_in_graph(keras_tensor.any_symbolic_tensors)
    def no_symbolic_tensors(args=None, kwargs=None):
        return False

    for pure in (variables.standardize_dtype, dtypes.result_type, core.to_torch_dtype):
        torch.compiler.substitute_in_graph(pure, can_constant_fold_through=True)(pure)
