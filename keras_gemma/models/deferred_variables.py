"""Build a Gemma backbone without allocating its weights.

Variables created in `deferred_variables()` get a shape and dtype but no
value (Keras' `StatelessScope(initialize_variables=False)` defers their
initializers). Loaders build the model so and `initialize_for_loading` gives
the weights zeros before the file's values are read: no random
initialization of weights about to be overwritten. `abstract_backbone`
builds one never to be allocated, for inspection (`count_params()`, the
weights' paths, shapes and dtypes): a 27B model builds in seconds on JAX,
TensorFlow and PyTorch alike.
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

