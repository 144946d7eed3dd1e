"""int8 weight-only products for decoding one token with PyTorch on a CPU.

Inductor compiles `sum(x * float(int8 kernel))` into loops that read the
int8 kernels at ~3-7 GB/s (float32 BLAS reads ~18 GB/s), so PyTorch decoded
int8 gemma3_270m at ~0.6x llama.cpp's speed. `int8_product.c` reads them at
15-20 GB/s (2 cores, AVX-512). It is compiled at first use with the system
C compiler (`$CC`, else `cc`; ~1 s) into the cache directory, keyed by its
source, the flags and the CPU, loaded with ctypes and registered as the
PyTorch operator `keras_gemma::int8_product`, which `torch.compile`d graphs
call as an external kernel. Without a working compiler (or OpenMP) the
product stays Inductor's, with a warning.
"""

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import warnings

from keras_gemma.staging import staged_file

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "int8_product.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")


def _cpu_description():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _compile(path, compiler):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with staged_file(path) as partial:
        subprocess.run(
            [compiler, *FLAGS, SOURCE, "-o", partial],
            check=True, capture_output=True, text=True, timeout=120,
        )


@functools.cache
def _library_function():
    """The compiled `keras_gemma_int8_product`, or None (warned) if it
    cannot be built or loaded."""
    from keras_gemma.checkpoints.pypi_model import cache_dir

    compiler = os.environ.get("CC", "cc")
    with open(SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(
        b"\0".join([source, " ".join((compiler, *FLAGS)).encode(), _cpu_description().encode()])
    ).hexdigest()[:16]
    path = os.path.join(cache_dir(), "kernels", f"int8_product-{key}.so")
    try:
        if not os.path.exists(path):
            _compile(path, compiler)
        function = ctypes.CDLL(path).keras_gemma_int8_product
    except (OSError, subprocess.SubprocessError) as e:
        details = getattr(e, "stderr", None) or e
        warnings.warn(
            f"keras_gemma could not build its int8 CPU kernel with {compiler!r} "
            f"({str(details).strip()[:300]}); PyTorch int8 decoding on this CPU "
            "uses slower compiled loops. Install a C compiler with OpenMP "
            "(gcc) or point $CC at one.",
            stacklevel=3,
        )
        return None
    function.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 3
    function.restype = ctypes.c_int
    return function


_prepared = None  # The registered operator, once `prepare()` built it.


def prepared_op():
    """The operator if `prepare()` built it, else None. Safe to call inside
    code that `torch.compile` traces (it only reads a global)."""
    return _prepared


def prepare():
    """Build, load and register the kernel (once per process); called
    eagerly when a layer gets int8 weights, never inside a traced decode
    step. Returns the operator, or None where it is unavailable."""
    global _prepared
    if _prepared is None:
        _prepared = _register_op()
    return _prepared


@functools.cache
def _register_op():
    """`op(x, w, a, c, b)`: float32 `[a * b]` with `y[i, j] = sum_k x[k] *
    w[i, k, j]` for a float32 `x` of `c` values and an int8 `w` holding
    `[a, c, b]`; None where the kernel is unavailable."""
    function = _library_function()
    if function is None:
        return None
    import torch

    @torch.library.custom_op("keras_gemma::int8_product", mutates_args=())
    def int8_product(x: torch.Tensor, w: torch.Tensor, a: int, c: int, b: int) -> torch.Tensor:
        x, w = x.contiguous(), w.contiguous()
        if x.dtype != torch.float32 or w.dtype != torch.int8 or x.numel() != c or w.numel() != a * c * b:
            raise ValueError(
                f"int8_product needs float32 x of {c} values and int8 w of "
                f"{a}x{c}x{b}; got {x.dtype} {tuple(x.shape)}, {w.dtype} {tuple(w.shape)}."
            )
        y = torch.empty(a * b, dtype=torch.float32)
        if function(x.data_ptr(), w.data_ptr(), y.data_ptr(), a, c, b) != 0:
            raise MemoryError("int8_product could not allocate its partial sums.")
        return y

    @int8_product.register_fake
    def _(x, w, a, c, b):
        return x.new_empty(a * b, dtype=torch.float32)

    return int8_product
