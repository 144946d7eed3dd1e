"""Peak memory of one LoRA training step on Gemma 3 270M, per weight dtype.

    python benchmarks/lora_memory.py [--backend jax] [--config float32] [--rank 8]

For each backend and configuration, a fresh child process loads
`gemma3_270m`, enables LoRA (default targets: query and value), compiles
with AdamW and runs two training steps (`train_on_batch`) at batch 4,
sequence length 256, with the response-only loss of instruction data.
Reported (from /proc/self/status; the high-water mark is reset with
`/proc/self/clear_refs` after loading, so the load's own peak does not
count):

- RSS after load: the process after `from_preset` (and `quantize`), with
  Python, Keras and the backend imported: the baseline;
- load peak: the highest RSS while loading (and quantizing);
- train peak: the highest RSS during the two steps (the first one compiles
  the step: JAX `jit`, TensorFlow XLA/graph, PyTorch `torch.compile`, as
  `compile()` does by default; `--torch-eager` runs PyTorch eagerly);
- increase: train peak minus the baseline;
- the parameter counts: LoRA (trainable) and total, and the weights' bytes.

Configurations:

- float32: `from_preset("gemma3_270m")`, float32 weights and compute;
- bfloat16: `from_preset(..., dtype="bfloat16")`: bfloat16 weights and
  compute (not mixed precision; the LoRA A/B adapters are float32, as
  `enable_lora` makes them);
- int8 (QLoRA): loaded in float32, then `gemma_lm.quantize("int8")`
  (weight-only int8 kernels and embedding, float32 compute), then LoRA;
- optional, with `--config`: mixed_bfloat16 (`dtype="mixed_bfloat16"`:
  float32 weights, bfloat16 compute) and int8_bfloat16 (loaded in
  bfloat16, then int8: bfloat16 compute).

A configuration that fails is reported with its error, not skipped.
"""

import argparse
import json
import os
import subprocess
import sys
import time

CONFIGS = ("float32", "bfloat16", "int8")
EXTRA_CONFIGS = ("mixed_bfloat16", "int8_bfloat16")

CHILD = r"""
import gc, json, os, sys, time, traceback

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Resets VmHWM to the current RSS.

args = json.loads(sys.argv[1])
config, result, stage = args["config"], {}, "import"
try:
    import keras, numpy as np
    import keras_gemma
    result["before_load"] = status("VmRSS")
    stage = "load"
    dtype = {"bfloat16": "bfloat16", "int8_bfloat16": "bfloat16",
             "mixed_bfloat16": "mixed_bfloat16"}.get(config)
    kwargs = {} if dtype is None else {"dtype": dtype}
    start = time.time()
    gemma_lm = keras_gemma.GemmaCausalLM.from_preset("gemma3_270m", **kwargs)
    if config.startswith("int8"):
        stage = "quantize"
        gemma_lm.quantize("int8")
    gc.collect()
    result["load_s"] = time.time() - start
    result["load_peak"] = status("VmHWM")
    result["after_load"] = status("VmRSS")
    result["weight_bytes"] = sum(
        int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in gemma_lm.weights
    )
    result["compute_dtype"] = gemma_lm.backbone.dtype_policy.compute_dtype
    reset_peak()

    stage = "enable_lora"
    gemma_lm.backbone.enable_lora(rank=args["rank"])
    result["lora_params"] = sum(int(np.prod(v.shape)) for v in gemma_lm.trainable_weights)
    result["lora_dtypes"] = sorted({str(v.dtype) for v in gemma_lm.trainable_weights})
    result["total_params"] = gemma_lm.count_params()
    stage = "compile"
    jit_compile = not args["torch_eager"] if keras.config.backend() == "torch" else "auto"
    gemma_lm.compile(optimizer=keras.optimizers.AdamW(1e-3, weight_decay=0.0), jit_compile=jit_compile)
    result["step_mode"] = {"jax": "jit", "tensorflow": "XLA" if gemma_lm.jit_compile else "graph",
                           "torch": "compile" if gemma_lm.jit_compile else "eager"}[keras.config.backend()]

    stage = "preprocess"
    batch, length = args["batch_size"], args["sequence_length"]
    preprocessor = gemma_lm.preprocessor
    preprocessor.sequence_length = length
    # Instruction data that fills the sequence: a prompt of about 40 tokens,
    # a long response (cut to fit, hence the warning filter).
    import warnings
    words = "the ship sails north across the grey sea while the crew sings".split()
    prompts = [" ".join(words[(i + j) % len(words)] for j in range(40)) for i in range(batch)]
    responses = [" ".join(words[(i * 3 + j) % len(words)] for j in range(400)) for i in range(batch)]
    data = {"prompts": prompts, "responses": responses}
    warnings.filterwarnings("ignore", message=".*sequence_length.*")
    x, _, sample_weight = preprocessor(data)
    result["tokens"] = int(keras.ops.convert_to_numpy(x["padding_mask"]).sum())
    result["loss_tokens"] = int(keras.ops.convert_to_numpy(sample_weight).sum())
    gc.collect()
    result["before_train"] = status("VmRSS")
    reset_peak()

    losses, seconds = [], []
    for step in range(2):
        stage = f"train step {step + 1}"
        start = time.time()
        # The task preprocesses the raw data, as `fit()` does.
        logs = gemma_lm.train_on_batch(data, return_dict=True)
        seconds.append(time.time() - start)
        losses.append(float(logs["loss"]))
        result[f"peak_step{step + 1}"] = status("VmHWM")
    result["losses"], result["step_s"] = losses, seconds
    result["train_peak"] = status("VmHWM")
except BaseException as error:
    result["error"] = {"stage": stage, "type": type(error).__name__, "message": str(error)[:2000],
                       "traceback": traceback.format_exc()[-4000:]}
print("RESULT " + json.dumps(result), flush=True)
"""


def run_child(backend, config, rank, batch_size, sequence_length, torch_eager):
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    args = dict(config=config, rank=rank, batch_size=batch_size,
                sequence_length=sequence_length, torch_eager=torch_eager)
    start = time.time()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(args)], env=env, capture_output=True, text=True
    )
    wall = time.time() - start
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if lines:
        result = json.loads(lines[-1][len("RESULT "):])
    else:  # Killed (out of memory?) or crashed without a Python exception.
        result = {"error": {
            "stage": "process", "type": f"exit status {done.returncode}",
            "message": (done.stderr.strip().splitlines() or ["(no output)"])[-1],
            "traceback": done.stderr[-4000:],
        }}
    result.update(backend=backend, config=config, wall_s=wall)
    return result


def gb(value):
    return f"{value / 2**30:.2f}" if value is not None else "-"


def format_table(results):
    header = (
        f"{'backend':<10} {'config':<14} {'compute':<8} {'step':<7} {'weights GiB':>11} "
        f"{'LoRA params':>11} {'total params':>12} {'LoRA %':>6} {'RSS load':>8} "
        f"{'load peak':>9} {'train peak':>10} {'increase':>8} {'step1 s':>7} {'step2 s':>7}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        prefix = f"{r['backend']:<10} {r['config']:<14} "
        if "error" in r and "lora_params" not in r:
            error = r["error"]
            lines.append(prefix + f"FAILED at {error['stage']}: {error['type']}: "
                         + (error["message"].splitlines() or [""])[0][:160])
            continue
        row = (
            prefix + f"{r['compute_dtype']:<8} {r.get('step_mode', '-'):<7} {gb(r['weight_bytes']):>11} "
            f"{r['lora_params']:>11,} {r['total_params']:>12,} "
            f"{100 * r['lora_params'] / r['total_params']:>6.2f} {gb(r['after_load']):>8} "
            f"{gb(r['load_peak']):>9} "
        )
        if "error" in r:
            error = r["error"]
            lines.append(row + f"FAILED at {error['stage']}: {error['type']}: "
                         + (error["message"].splitlines() or [""])[0][:160])
            continue
        lines.append(
            row + f"{gb(r['train_peak']):>10} {gb(r['train_peak'] - r['after_load']):>8} "
            f"{r['step_s'][0]:>7.1f} {r['step_s'][1]:>7.1f}"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", action="append", choices=("jax", "tensorflow", "torch"))
    parser.add_argument("--config", action="append", choices=CONFIGS + EXTRA_CONFIGS)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--sequence-length", type=int, default=256)
    parser.add_argument(
        "--torch-eager", action="store_true",
        help="run the PyTorch training step eagerly (default: torch.compile, as compile() does)",
    )
    parser.add_argument("--json", help="also write the raw results to this file")
    args = parser.parse_args()
    results = []
    for backend in args.backend or ["jax", "tensorflow", "torch"]:
        for config in args.config or CONFIGS:
            print(f"{backend} {config} ...", file=sys.stderr, flush=True)
            results.append(
                run_child(backend, config, args.rank, args.batch_size, args.sequence_length,
                          args.torch_eager)
            )
    print(
        f"gemma3_270m, LoRA rank {args.rank} on query/value, AdamW, batch {args.batch_size} x "
        f"sequence {args.sequence_length}; RSS in GiB (train peak: highest RSS over two "
        "train_on_batch steps, the first compiling; increase: over the RSS after load)"
    )
    print(format_table(results))
    for r in results:
        if "error" in r:
            print(f"\n{r['backend']} {r['config']} failed at {r['error']['stage']}:\n"
                  f"{r['error']['traceback']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
