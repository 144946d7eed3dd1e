"""Where a GPU decode step spends its time: our `generate()` on the
backend that KERAS_BACKEND names, timed as `keras-gemma bench` times it,
then traced (JAX's profiler or PyTorch's, both through CUPTI) and reduced
to a table of the GPU kernels that one decoded token runs.

    KERAS_BACKEND=jax python benchmarks/gpu/profile_decode.py OUT --weights DIR
    KERAS_BACKEND=jax python benchmarks/gpu/profile_decode.py OUT --config gemma_2b_en

`--weights` takes a `keras-gemma bench --weights-dir` directory; `--config`
builds random weights of a catalog architecture in memory (no files: a
minute less on a fresh machine). The kernels of one token are the
difference between a call of `--new-tokens` and a call of one new token,
divided by the tokens between them. Variants are compiled and timed next to
the default in the same process: `--xla-variant` (JSON: XLA options of
JAX's generate function), `--row-copies-variant N` (`one_row_copies`). The
raw traces (.json.gz) of the default go to OUT.
"""

import argparse
import collections
import contextlib
import glob
import gzip
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from keras_gemma import bench


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights")
    source.add_argument("--config")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--xla-variant", action="append", default=[], type=json.loads)
    parser.add_argument("--row-copies-variant", action="append", default=[], type=int)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()

    import keras

    backend = keras.config.backend()
    gemma_lm, vocabulary_size = load(args)
    prompts = np.random.default_rng(0).integers(3, vocabulary_size, (1, args.prompt_length))
    prompts = prompts.astype("int32")

    variants = [{}] + [{"xla": v} for v in args.xla_variant if backend == "jax"]
    variants += [{"one_row_copies": n} for n in args.row_copies_variant]
    for variant in variants:
        with patched(variant):
            run = compiled_runner(gemma_lm)
            start = time.perf_counter()
            run(prompts, args.new_tokens)
            first_call = time.perf_counter() - start
            full, one = [], []
            for _ in range(3):
                full.append(bench._timed(lambda: run(prompts, args.new_tokens)))
                one.append(bench._timed(lambda: run(prompts, 1)))
        decode_s = (min(full) - min(one)) / (args.new_tokens - 1)
        print(
            f"{backend} variant {json.dumps(variant)}: first call {first_call:.1f} s, "
            f"decode {1 / decode_s:.1f} tok/s ({decode_s * 1e3:.3f} ms/token), "
            f"1-token call {min(one) * 1e3:.1f} ms",
            flush=True,
        )
    if len(variants) > 1:  # The default again, for the traces.
        run = compiled_runner(gemma_lm)
        run(prompts, args.new_tokens)
        run(prompts, 1)

    os.makedirs(args.out, exist_ok=True)
    traced = {}
    for name, tokens in (("full", args.new_tokens), ("one", 1)):
        path = os.path.join(args.out, f"trace_{backend}_{name}.json.gz")
        trace(backend, lambda t=tokens: run(prompts, t), path)
        traced[name] = gpu_kernels(path)
    report(traced["full"], traced["one"], args.new_tokens - 1, args.top)


def load(args):
    """`(gemma_lm, vocabulary_size)`: from bench weights, or random."""
    import keras

    from keras_gemma.checkpoints.loading import catalog
    from keras_gemma.models.gemma_backbone import GemmaBackbone
    from keras_gemma.models.gemma_causal_lm import GemmaCausalLM

    if args.weights:
        with open(os.path.join(args.weights, "config.json")) as f:
            vocabulary_size = json.load(f)["vocab_size"]
        return bench._load_ours(args.weights, args.dtype, None), vocabulary_size
    kwargs = bench.CONFIGS.get(args.config) or catalog()[args.config]["config"]
    keras.utils.set_random_seed(0)
    backbone = GemmaBackbone(**kwargs, dtype=args.dtype)
    return GemmaCausalLM(backbone, preprocessor=None), kwargs["vocabulary_size"]


def compiled_runner(gemma_lm):
    """`run(prompts, new_tokens)`, with a generate function compiled anew."""
    gemma_lm.compile(sampler="greedy")
    return bench._keras_runner(gemma_lm)


@contextlib.contextmanager
def patched(variant):
    """Within: JAX's generate function compiled with the variant's XLA
    options, `one_row_copies` returning its count."""
    from keras_gemma.layers import dense
    from keras_gemma.models import compiled_generation

    saved = compiled_generation.jax_compiler_options, dense.one_row_copies
    if "xla" in variant:
        options = {**(saved[0]() or {}), **variant["xla"]}
        compiled_generation.jax_compiler_options = lambda: options
    if "one_row_copies" in variant:
        dense.one_row_copies = lambda: variant["one_row_copies"]
    try:
        yield
    finally:
        compiled_generation.jax_compiler_options, dense.one_row_copies = saved


def trace(backend, function, path):
    """Run `function` under the backend's profiler; write a Chrome trace."""
    if backend == "jax":
        import jax

        directory = tempfile.mkdtemp()
        with jax.profiler.trace(directory):
            function()
        (found,) = glob.glob(os.path.join(directory, "plugins/profile/*/*.trace.json.gz"))
        shutil.move(found, path)
        shutil.rmtree(directory)
    else:
        import torch

        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as profile:
            function()  # Its tokens come back as NumPy: the GPU has finished.
        plain = path[: -len(".gz")]
        profile.export_chrome_trace(plain)
        with open(plain, "rb") as f, gzip.open(path, "wb") as g:
            shutil.copyfileobj(f, g)
        os.remove(plain)


def gpu_kernels(path):
    """`[(name, start_us, duration_us)]` of the GPU's kernels and copies."""
    with gzip.open(path) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = {}  # (pid, tid) or pid -> name, from the metadata events.
    for e in events:
        if e.get("ph") == "M" and e.get("name") in ("process_name", "thread_name"):
            key = e["pid"] if e["name"] == "process_name" else (e["pid"], e.get("tid"))
            names[key] = e["args"]["name"]
    kernels = []
    for e in events:
        if e.get("ph") != "X":
            continue
        if "cat" in e:  # PyTorch: categories mark the GPU's work.
            keep = e["cat"] in ("kernel", "gpu_memcpy", "gpu_memset")
        else:  # JAX: the GPU's stream lines (its "XLA Ops" lines repeat them).
            process = str(names.get(e["pid"], ""))
            thread = str(names.get((e["pid"], e.get("tid")), ""))
            keep = "GPU" in process and thread.startswith("Stream")
        if keep:
            label = e["name"]
            hlo_op = (e.get("args") or {}).get("hlo_op")
            if hlo_op:
                label = f"{hlo_op} | {label}"
            kernels.append((label, float(e["ts"]), float(e["dur"])))
    return kernels


def report(full, one, tokens, top):
    if not full:
        print("no GPU kernels in the trace")
        return

    def totals(kernels):
        time_by_name, count_by_name = collections.Counter(), collections.Counter()
        for name, _, duration in kernels:
            time_by_name[name] += duration
            count_by_name[name] += 1
        return time_by_name, count_by_name

    (full_time, full_count), (one_time, one_count) = totals(full), totals(one)
    busy = (sum(full_time.values()) - sum(one_time.values())) / tokens
    count = (sum(full_count.values()) - sum(one_count.values())) / tokens
    span = lambda k: max(s + d for _, s, d in k) - min(s for _, s, _ in k)  # noqa: E731
    print(
        f"per decoded token: {count:.0f} kernels, {busy:.1f} us of kernel time; GPU span "
        f"{(span(full) - span(one)) / tokens:.1f} us (full call {span(full) / 1e3:.1f} ms, "
        f"{len(full)} kernels; 1-token call {span(one) / 1e3:.1f} ms, {len(one)} kernels)"
    )
    rows = []
    for name in full_time:
        time_per_token = (full_time[name] - one_time[name]) / tokens
        calls = (full_count[name] - one_count[name]) / tokens
        rows.append((time_per_token, calls, name))
    rows.sort(reverse=True)
    print(f"{'us/token':>9} {'calls':>6} {'us/call':>8}  kernel")
    for time_per_token, calls, name in rows[:top]:
        per_call = time_per_token / calls if calls else float("nan")
        print(f"{time_per_token:9.1f} {calls:6.1f} {per_call:8.2f}  {name[:150]}")
    rest = sum(r[0] for r in rows[top:])
    print(f"{rest:9.1f} {sum(r[1] for r in rows[top:]):6.1f}           (the other {len(rows[top:])})")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
