"""Peak memory of importing a Gemma-2B-shaped checkpoint in bfloat16.

    python benchmarks/import_memory.py [--workdir DIR] [--backend jax]

Writes a random bfloat16 HF safetensors checkpoint of the Gemma 1 2B shape
(5.0 GB) in a child process, then, in a fresh child process per backend,
loads it with `GemmaCausalLM.from_preset(dir, dtype="bfloat16")` and reports
the peak RSS growth over the process's RSS before the load (Python, Keras
and the backend already imported), as a ratio to the model's bfloat16 size.
Target: about 1.3x or less.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

GEMMA_2B = dict(
    vocab_size=256000, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
    num_attention_heads=8, num_key_value_heads=1, head_dim=256,
)

WRITE = r"""
import json, sys, numpy as np, ml_dtypes
from safetensors.numpy import save_file
config = json.loads(sys.argv[2]); out = sys.argv[1]
D, F, V, L = config["hidden_size"], config["intermediate_size"], config["vocab_size"], config["num_hidden_layers"]
N, K, H = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
rng = np.random.default_rng(0)
def w(*shape):
    return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
tensors = {"model.embed_tokens.weight": w(V, D), "model.norm.weight": w(D)}
for i in range(L):
    p = f"model.layers.{i}."
    tensors.update({p + "input_layernorm.weight": w(D), p + "post_attention_layernorm.weight": w(D),
        p + "self_attn.q_proj.weight": w(N * H, D), p + "self_attn.k_proj.weight": w(K * H, D),
        p + "self_attn.v_proj.weight": w(K * H, D), p + "self_attn.o_proj.weight": w(D, N * H),
        p + "mlp.gate_proj.weight": w(F, D), p + "mlp.up_proj.weight": w(F, D), p + "mlp.down_proj.weight": w(D, F)})
save_file(tensors, out + "/model.safetensors")
json.dump({"model_type": "gemma", "torch_dtype": "bfloat16", **config}, open(out + "/config.json", "w"))
"""

LOAD = r"""
import os, sys, json, time
import keras, keras_gemma
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
before = status("VmRSS")
start = time.time()
gemma_lm = keras_gemma.GemmaCausalLM.from_preset(sys.argv[1], dtype="bfloat16")
seconds = time.time() - start
# This process' own high-water mark (getrusage's would count the parent's peak).
peak = status("VmHWM")
model_bytes = 2 * gemma_lm.backbone.count_params()  # bfloat16
print(json.dumps({"backend": keras.config.backend(), "before": before, "peak": peak,
                  "model_bytes": model_bytes, "seconds": seconds}))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--backend", action="append", choices=("jax", "tensorflow", "torch"))
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="gemma2b-bf16-")
    os.makedirs(workdir, exist_ok=True)
    if not os.path.isfile(os.path.join(workdir, "model.safetensors")):
        print(f"writing a random Gemma 2B bfloat16 checkpoint to {workdir} ...", flush=True)
        subprocess.run([sys.executable, "-c", WRITE, workdir, json.dumps(GEMMA_2B)], check=True)
    # The importer needs a tokenizer next to the weights: a tiny one will do.
    tokenizer = os.path.join(workdir, "tokenizer.model")
    if not os.path.isfile(tokenizer):
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from tests.helpers import train_sentencepiece

        with open(tokenizer, "wb") as f:
            f.write(train_sentencepiece())
    print(f"{'backend':<11} {'model GB':>9} {'peak growth GB':>15} {'ratio':>6} {'load s':>7}")
    for backend in args.backend or ["jax", "tensorflow", "torch"]:
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
        done = subprocess.run([sys.executable, "-c", LOAD, workdir], env=env, capture_output=True, text=True)
        if done.returncode:
            print(f"{backend:<11} failed: {done.stderr.strip().splitlines()[-1]}")
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        growth = result["peak"] - result["before"]
        print(f"{backend:<11} {result['model_bytes'] / 1e9:>9.2f} {growth / 1e9:>15.2f} "
              f"{growth / result['model_bytes']:>6.2f} {result['seconds']:>7.1f}")


if __name__ == "__main__":
    main()
