# %% [markdown]
# # Teach Gemma a response style with LoRA
#
# Fine-tune the default model (Gemma 3 270M) on a small instruction data set
# with LoRA: the backbone stays frozen and only small low-rank adapters on
# the attention projections are trained. The data set is made up in this
# guide: questions answered in a fixed, easy-to-spot pirate style
# (`Arr, matey! ... , savvy?`). After a few minutes of training on a CPU the
# model answers new questions in that style. Then the adapters are saved to
# a small file, loaded into a freshly loaded model, and merged into its
# weights.
#
# Runs as a script (`python guides/lora_finetuning.py`) or cell by cell in a
# notebook (`pip install jupytext`, then `jupytext --to notebook guides/lora_finetuning.py`), on any
# Keras backend (`KERAS_BACKEND=jax|tensorflow|torch`). The full run takes
# about 5 to 10 minutes on a 2-core CPU. With `KERAS_GEMMA_GUIDE_FAST=1`
# (what CI does) it runs every step on a few examples for two training
# steps, generating only after training: about two minutes, with numbers
# that mean nothing. Files (the loss plot, the adapters) go to
# `KERAS_GEMMA_GUIDE_OUTPUT` (default: `.`).
# Needs `pip install 'keras-gemma[guides]'` and a backend (e.g. `[jax]`).

# %%
import os

os.environ.setdefault("KERAS_BACKEND", "jax")  # or "tensorflow", "torch"
# JAX and TensorFlow compile the training step and the generation loop in
# seconds. On a CPU, `torch.compile` of the training step takes minutes,
# more than this short training saves: keep PyTorch eager (set it to "1" on
# a GPU or for long runs).
os.environ.setdefault("KERAS_GEMMA_TORCH_COMPILE", "0")

import time

GUIDE_START = time.time()

import keras
import matplotlib
import numpy as np

import keras_gemma

if "inline" not in matplotlib.get_backend():
    matplotlib.use("Agg")  # A script writes files, opens no window.
import matplotlib.pyplot as plt

FAST = os.environ.get("KERAS_GEMMA_GUIDE_FAST") == "1"
OUTPUT = os.environ.get("KERAS_GEMMA_GUIDE_OUTPUT", ".")
os.makedirs(OUTPUT, exist_ok=True)
keras.utils.set_random_seed(0)  # The adapters' initialization, the shuffling.
print("backend:", keras.config.backend(), "| fast mode" if FAST else "| full mode")

# %% [markdown]
# ## The model before fine-tuning
#
# Gemma 3 270M is a base model: given a question in a simple
# `Question: ...\nAnswer:` format it continues the text, here with the answer
# and then more questions of its own. Greedy decoding (the default sampler)
# makes every answer in this guide reproducible.

# %%
gemma_lm = keras_gemma.GemmaCausalLM.from_preset("gemma3_270m")


def ask(question):
    return f"Question: {question}\nAnswer:"


PROMPT = ask("What is the capital of France?")  # France is not in the data.
HELD_OUT = ask("Who wrote Romeo and Juliet?")  # Nor are questions like this one.
MAX_LENGTH = 24 if FAST else 48  # Prompt plus answer, in tokens.


def answers(model):
    outputs = model.generate([PROMPT, HELD_OUT], max_length=MAX_LENGTH, strip_prompt=True)
    return [output.strip() for output in outputs]


# Fast mode skips this generation and the reloaded model's (each compiles a
# generation function for a new model or new weights: the slowest cells).
before = ["(skipped in fast mode)"] * 2 if FAST else answers(gemma_lm)
for prompt, answer in zip([PROMPT, HELD_OUT], before):
    print(f"{prompt!r}\n  -> {answer!r}")

# %% [markdown]
# ## A synthetic instruction data set
#
# Instruction data for `fit()` is a dict of `prompts` and `responses`. The
# preprocessor packs each pair as `<bos> prompt response <eos>` and the loss
# covers the response only (its `<eos>` included, so the model also learns
# to stop). The responses follow five templates, all in the same style:
# they start with `Arr, matey!` and end with `, savvy?`.
#
# (For chat-formatted tuning, set `apply_chat_template=True` on the
# preprocessor: prompts and responses are then wrapped in Gemma's
# `<start_of_turn>` chat template, for training and generation alike.)

# %%
CAPITALS = {
    "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "Egypt": "Cairo", "Canada": "Ottawa", "Greece": "Athens", "Norway": "Oslo",
    "Poland": "Warsaw", "Russia": "Moscow", "China": "Beijing", "Peru": "Lima",
    "Kenya": "Nairobi", "Sweden": "Stockholm", "Ireland": "Dublin",
    "Portugal": "Lisbon", "Austria": "Vienna", "Cuba": "Havana",
    "Thailand": "Bangkok", "Argentina": "Buenos Aires",
}
COLORS = {
    "the sky": "blue", "grass": "green", "snow": "white", "a banana": "yellow",
    "coal": "black", "a ripe tomato": "red", "an orange": "orange",
    "a lemon": "yellow", "a flamingo": "pink", "chocolate": "brown",
    "the sea": "blue", "a pumpkin": "orange", "milk": "white", "a crow": "black",
}
SOUNDS = {
    "dog": "woof", "cat": "meow", "cow": "moo", "duck": "quack", "sheep": "baa",
    "pig": "oink", "owl": "hoot", "horse": "neigh", "frog": "ribbit",
    "rooster": "cock-a-doodle-doo", "lion": "roar", "snake": "hiss",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "light": "dark",
    "happy": "sad", "early": "late", "full": "empty", "old": "new",
    "open": "closed", "strong": "weak", "wet": "dry", "loud": "quiet",
    "rich": "poor", "high": "low", "left": "right", "first": "last",
}


def example(kind, rng):
    """One (prompt, response) pair of the given kind."""
    if kind == 0:
        country, capital = list(CAPITALS.items())[rng.integers(len(CAPITALS))]
        question, fact = f"What is the capital of {country}?", f"The capital of {country} be {capital}"
    elif kind == 1:
        thing, color = list(COLORS.items())[rng.integers(len(COLORS))]
        question, fact = f"What color is {thing}?", f"{thing[0].upper() + thing[1:]} be {color}"
    elif kind == 2:
        animal, sound = list(SOUNDS.items())[rng.integers(len(SOUNDS))]
        question, fact = f"What sound does a {animal} make?", f"The {animal} says {sound}"
    elif kind == 3:
        word, opposite = list(OPPOSITES.items())[rng.integers(len(OPPOSITES))]
        question, fact = f"What is the opposite of {word}?", f"The opposite of {word} be {opposite}"
    else:
        a, b = rng.integers(1, 50, size=2)
        question, fact = f"What is {a} plus {b}?", f"{a} plus {b} be {a + b}"
    # The response starts with a space: it follows "Answer:" directly.
    return ask(question), f" Arr, matey! {fact}, savvy?"


NUM_EXAMPLES = 8 if FAST else 128
rng = np.random.default_rng(0)
pairs = [example(i % 5, rng) for i in range(NUM_EXAMPLES)]
data = {"prompts": [p for p, _ in pairs], "responses": [r for _, r in pairs]}
for prompt, response in pairs[:5]:
    print(f"{prompt!r} -> {response!r}")

# %% [markdown]
# Short sequences train much faster (most of the cost of a step on this
# model is its 262k-token output layer, per position). The longest example
# here has 36 tokens with `<bos>` and `<eos>`: a sequence length of 36 fits
# every one (inputs and labels are the packed tokens shifted by one); the
# preprocessor warns if an example had to be cut.

# %%
gemma_lm.preprocessor.sequence_length = 36
x, y, sample_weight = gemma_lm.preprocessor({"prompts": data["prompts"][:1], "responses": data["responses"][:1]})
tokens = int(np.sum(keras.ops.convert_to_numpy(x["padding_mask"])))
weighted = int(np.sum(keras.ops.convert_to_numpy(sample_weight)))
print(f"first example: {tokens} tokens, of which {weighted} targets carry loss (the response and <eos>)")

# %% [markdown]
# ## LoRA
#
# `enable_lora` freezes the whole backbone and adds rank-8 adapters to the
# query and value projections of every decoder block (the default targets;
# `target_layer_names="all"` adds the key, attention output and feed-forward
# projections too). Under 0.2% of the parameters are trained.

# %%
gemma_lm.backbone.enable_lora(rank=8)
trainable = sum(int(np.prod(v.shape)) for v in gemma_lm.trainable_weights)
total = gemma_lm.count_params()
print(f"trainable: {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")

# %% [markdown]
# Compile with AdamW. LoRA tolerates (and needs) a larger learning rate
# than full fine-tuning; no weight decay on the adapters. The default loss
# is the token-level cross-entropy weighted by the preprocessor's
# `sample_weight` (zero on the prompt and the padding) and, as Keras
# reduces it, divided by all positions of the batch, so its values are
# smaller than the mean over the response tokens. (Pass
# `loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True,
# reduction="mean_with_sample_weight")` for that mean.)
#
# Keras logs the running mean of the loss over an epoch; the small callback
# below recovers each step's own loss from it (all batches have the same
# size), for the plot.

# %%
BATCH_SIZE = 4
EPOCHS = 1 if FAST else 2
gemma_lm.compile(
    optimizer=keras.optimizers.AdamW(learning_rate=2e-3, weight_decay=0.0),
    weighted_metrics=[keras.metrics.SparseCategoricalAccuracy()],
)


class StepLosses(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.losses = []

    def on_epoch_begin(self, epoch, logs=None):
        self.step, self.mean = 0, 0.0

    def on_train_batch_end(self, batch, logs=None):
        mean = float(logs["loss"])
        self.step += 1
        self.losses.append(self.step * mean - (self.step - 1) * self.mean)
        self.mean = mean


step_losses = StepLosses()
start = time.time()
history = gemma_lm.fit(data, batch_size=BATCH_SIZE, epochs=EPOCHS, callbacks=[step_losses], verbose=2)
train_seconds = time.time() - start
epoch_losses = history.history["loss"]
print(f"trained {len(step_losses.losses)} steps in {train_seconds:.0f} s")
print("loss per epoch:", ", ".join(f"{loss:.3f}" for loss in epoch_losses))
print(f"loss of the first step {step_losses.losses[0]:.3f}, of the last step {step_losses.losses[-1]:.3f}")

# %% [markdown]
# The loss curve (the file is written next to the adapters; in a notebook
# the figure also shows inline).

# %%
steps_per_epoch = len(step_losses.losses) // len(epoch_losses)
fig, ax = plt.subplots(figsize=(7, 4))
ax.plot(np.arange(1, len(step_losses.losses) + 1), step_losses.losses, label="loss of each step", alpha=0.6)
ax.plot(
    [steps_per_epoch * (i + 1) for i in range(len(epoch_losses))], epoch_losses,
    "o-", label="mean over the epoch",
)
ax.set_xlabel("training step (batch of %d)" % BATCH_SIZE)
ax.set_ylabel("training loss (weighted cross-entropy)")
ax.set_yscale("log")
ax.set_title(f"LoRA rank 8 on Gemma 3 270M ({keras.config.backend()})")
ax.legend()
fig.tight_layout()
plot_path = os.path.join(OUTPUT, "lora_loss.png")
fig.savefig(plot_path, dpi=100)
print("loss plot written to", plot_path)

# %% [markdown]
# ## The model after fine-tuning
#
# Both the prompt from the start (France was not in the data) and a question
# unlike any in the data now get a pirate answer, and the model stops after
# it (it learned the `<eos>`).

# %%
after = answers(gemma_lm)
for prompt, old, new in zip([PROMPT, HELD_OUT], before, after):
    print(f"{prompt!r}\n  before: {old!r}\n  after:  {new!r}")
print("in the trained style:", [answer.startswith("Arr, matey!") for answer in after])

# %% [markdown]
# ## Save the adapters and load them into a fresh model
#
# `save_lora_weights` writes the adapters only (a few MB, with their rank,
# alpha and target names), not the 270M base weights. `load_lora_weights`
# on a freshly loaded model enables LoRA with the file's settings and
# restores the adapters: the same logits, the same answers. The file is
# backend independent (train on one backend, serve on another).

# %%
from keras_gemma.lora import read_adapter_metadata

adapter_path = os.path.join(OUTPUT, "pirate.lora.safetensors")
gemma_lm.backbone.save_lora_weights(adapter_path)
print(f"adapters written to {adapter_path} ({os.path.getsize(adapter_path) / 1e6:.1f} MB)")

fresh = keras_gemma.GemmaCausalLM.from_preset("gemma3_270m")
fresh.backbone.load_lora_weights(adapter_path)
metadata = read_adapter_metadata(adapter_path)
print("adapter file:", {key: metadata[key] for key in ("rank", "alpha", "target_layer_names")})


def logits(model, batch):
    return keras.ops.convert_to_numpy(model(batch))


check = {"token_ids": x["token_ids"], "padding_mask": x["padding_mask"]}
trained_logits = logits(gemma_lm, check)
difference = np.max(np.abs(logits(fresh, check) - trained_logits))
print(f"reloaded adapter: max |logit diff| = {difference:.3g}")
if not FAST:
    print(f"reloaded adapter: same answers: {answers(fresh) == after}")

# %% [markdown]
# ## Merge the adapters
#
# `merge_lora` folds `W + (alpha / rank) * A @ B` into each kernel and
# removes the adapters: a plain model again, as fast as the base one, with
# the fine-tuned behaviour (up to float rounding). Save it as a preset with
# `save_to_preset` to ship it without keras_gemma's LoRA code. Merging
# changes the model's variables: `generate()` notices and rebuilds its
# function; `compile()` again before training more (the train step was
# built for the adapters).

# %%
fresh.backbone.merge_lora()
difference = np.max(np.abs(logits(fresh, check) - trained_logits))
print(f"merged: max |logit diff| = {difference:.3g}")
if not FAST:  # A new generation function to compile: skipped in fast mode.
    merged = answers(fresh)
    print(f"merged: same answers: {merged == after}")
print(f"guide done in {time.time() - GUIDE_START:.0f} s")
