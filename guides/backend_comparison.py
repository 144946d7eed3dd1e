# %% [markdown]
# # Which Keras backend generates fastest?
#
# keras_gemma runs one model definition on JAX, TensorFlow and PyTorch.
# This guide times `generate()` on each backend, next to KerasHub's
# `GemmaCausalLM` and Hugging Face transformers on the same weights, and
# plots the result. It is `keras-gemma bench` from Python.
#
# Runs as a script (`python guides/backend_comparison.py`) or cell by cell
# in a notebook (`pip install jupytext`, then `jupytext --to notebook guides/backend_comparison.py`).
# With `KERAS_GEMMA_GUIDE_FAST=1` (what CI does) it runs a tiny model for a
# few tokens on the current `KERAS_BACKEND` only: seconds instead of
# minutes, numbers without meaning. Needs `pip install
# 'keras-gemma[guides]'` and the backends to compare (`[all]`).

# %%
import os

from keras_gemma import bench

FAST = os.environ.get("KERAS_GEMMA_GUIDE_FAST") == "1"
PLOT_PATH = os.environ.get("KERAS_GEMMA_GUIDE_OUTPUT", ".")

# %% [markdown]
# Each implementation and backend runs in its own process (a fresh process
# per backend is the only way to use several Keras backends from one
# script). The default "cpu" config is a small random-weight Gemma: 4
# layers, hidden size 512, one key/value head, a 32000-token vocabulary,
# about 125 MB of float32 weights. On a GPU, try `config="gemma_2b_en"` with
# `dtype="bfloat16"`, or `preset="gemma3_270m"` for the real model.

# %%
if FAST:
    backend = os.environ.get("KERAS_BACKEND", "jax")
    settings = dict(
        config="tiny", backends=(backend,),
        compare=("keras_hub", "transformers") if backend == "torch" else ("keras_hub",),
        prompt_length=4, new_tokens=24, repeats=2,
    )
else:
    settings = dict(config="cpu", prompt_length=32, new_tokens=96, repeats=3)

header, rows = bench.run_benchmark(**settings)
print(bench.format_table(header, rows))

# %% [markdown]
# Decode speed is what a chat user feels (tokens per second after the first
# one); prefill speed is how fast the prompt is read; "first call" includes
# compilation (JAX `jit`, TensorFlow XLA, `torch.compile`), paid once per
# input shape.

# %%
import matplotlib

if "inline" not in matplotlib.get_backend():
    matplotlib.use("Agg")  # A script writes files, opens no window.
import matplotlib.pyplot as plt

labels = [f"{row['implementation']}\n{row['backend']}" for row in rows]
fig, (decode_ax, first_ax) = plt.subplots(1, 2, figsize=(11, 4))
colors = [
    {"keras_gemma": "tab:blue", "keras_hub": "tab:gray", "transformers": "tab:orange", "llama_cpp": "tab:green"}[
        row["implementation"]
    ]
    for row in rows
]
# A decode speed too fast to measure at this length is None ("-" in the table).
decode_ax.bar(labels, [row["decode_tokens_per_s"] or 0 for row in rows], color=colors)
decode_ax.set_ylabel("decode tokens / s (higher is better)")
first_ax.bar(labels, [row["first_call_s"] for row in rows], color=colors)
first_ax.set_ylabel("first call, s (compilation included)")
for ax in (decode_ax, first_ax):
    ax.tick_params(axis="x", labelsize=8)
fig.suptitle(
    f"{header['model']}, {header['dtype']}, batch {header['batch_size']}, "
    f"{header['new_tokens']} new tokens - {header['machine']}, {header['date']}",
    fontsize=9,
)
fig.tight_layout()
path = os.path.join(PLOT_PATH, "backend_comparison.png")
fig.savefig(path, dpi=120)
print("plot written to", path)
