"""Build a Gemma backbone's architecture without allocating its weights.

`abstract_backbone(**config)` constructs a real `GemmaBackbone` (every layer,
every variable, the functional graph) while creating its variables inside a
`keras.StatelessScope(initialize_variables=False)`. Keras then records each
variable's shape and dtype and defers running its initializer, so no weight
memory is allocated: a 27B model builds in seconds in about the memory of the
framework itself, on JAX, TensorFlow and PyTorch alike (the symbolic pass
that builds the layers runs under `jax.eval_shape`, a TensorFlow graph or
PyTorch's "meta" device).

The result is for inspection only (`count_params()`, the weights' paths,
shapes and dtypes, `get_config()`): its variables have no values, so do not
call it, train it or save its weights.
"""

import contextlib

import keras
from keras.src.backend.common import global_state
from keras.src.backend.common.stateless_scope import in_stateless_scope

# Keras' registry of variables whose initializer has not run yet; leaving a
# stateless scope with `initialize_variables=True` initializes all of them.
_UNINITIALIZED = "uninitialized_variables"


@contextlib.contextmanager
def deferred_variables():
    """Within this context, new Keras variables get a shape but no value.

    On exit the variables created inside are dropped from Keras' registry of
    pending initializations, so a later `keras.StatelessScope` cannot
    allocate them behind your back.
    """
    if in_stateless_scope():
        raise RuntimeError(
            "deferred_variables() cannot be entered inside a "
            "keras.StatelessScope (or while a model is being traced)."
        )
    previous = global_state.get_global_attribute(_UNINITIALIZED)
    global_state.set_global_attribute(_UNINITIALIZED, [])
    try:
        with keras.StatelessScope(initialize_variables=False):
            yield
    finally:
        global_state.set_global_attribute(_UNINITIALIZED, previous)


def initialize_for_loading(model):
    """Give the weights of a model built in `deferred_variables()` zeros, and
    its other variables (seed generator states) their initial values.

    For a model whose weights are read from a file next: zeros cost one
    buffer per weight, where Keras' random initializers hold several
    temporaries of each (3.7 GB peak to build gemma3_270m, whose weights
    are 1.07 GB).
    """
    weights = {id(w) for w in model.weights}
    for variable in model.variables:
        if variable._value is None:
            if id(variable) in weights:
                variable._initialize(keras.ops.zeros(variable.shape, variable.dtype))
            else:
                variable._deferred_initialize()


def abstract_backbone(**config):
    """A `GemmaBackbone(**config)` whose weights are never allocated.

    Example:
    ```python
    entry = keras_gemma.GemmaBackbone.presets["gemma2_27b_en"]
    abstract_backbone(**entry["config"]).count_params()  # 27227128320
    ```
    """
    from keras_gemma.models.gemma_backbone import GemmaBackbone

    with deferred_variables():
        backbone = GemmaBackbone(**config)
    allocated = [w.path for w in backbone.weights if w._value is not None]
    if allocated:
        raise RuntimeError(
            f"abstract_backbone allocated {len(allocated)} weights "
            f"(e.g. {allocated[0]}) although it should allocate none."
        )
    return backbone


def count_backbone_params(**config):
    """Parameter count of `GemmaBackbone(**config)` (the tied embedding
    counted once), without allocating the weights."""
    return abstract_backbone(**config).count_params()
