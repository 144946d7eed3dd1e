"""A batch of a long and a short prompt: prompts aligned at their ends
(each prefilled whole) against the old way.

    python benchmarks/ragged_batch.py [--preset gemma3_270m] [--new-tokens 32] [--backend jax]

In a fresh process per backend, greedy `generate()` of a long prompt
(~440 tokens) beside a short one, timed on its second call (the first
compiles), once as generate() runs it and once the old way
(`compiled_generation.aligned_for_generation` made a no-op: decoding
starts at the short prompt's end and feeds the long prompt's other tokens
one decode step each, as KerasHub does). Two calls: `max_new_tokens=N`
without stop ids, and `max_length=512` stopping at the first "." (rows
that stop early: aligned, the long prompt's answer need not wait). Both
ways run in the same process, and must give the same text.
"""

import argparse
import json
import os
import subprocess
import sys

MEASURE = r"""
import json, sys, time
import keras, keras_gemma
from keras_gemma.models import compiled_generation

preset, new_tokens = sys.argv[1], int(sys.argv[2])
sentence = "The history of the city goes back many centuries, and its people tell stories of it. "
prompts = [sentence * 24 + "Summarize:", "The capital of France is"]
gemma_lm = keras_gemma.GemmaCausalLM.from_preset(preset)
period = int(gemma_lm.preprocessor.tokenizer.token_to_id("."))
calls = {
    f"max_new_tokens={new_tokens}": dict(max_new_tokens=new_tokens, stop_token_ids=None),
    "max_length=512, stop at '.'": dict(max_length=512, stop_token_ids=[period]),
}
aligned = compiled_generation.aligned_for_generation
results = []
for call, kwargs in calls.items():
    seconds, texts = {}, {}
    for way in ("aligned", "old") * 2:  # The second round is timed.
        compiled_generation.aligned_for_generation = aligned if way == "aligned" else (lambda inputs, *_: inputs)
        start = time.perf_counter()
        texts[way] = gemma_lm.generate(prompts, **kwargs)
        seconds[way] = time.perf_counter() - start
    results.append({"call": call, "seconds": seconds, "same_text": texts["aligned"] == texts["old"]})
print(json.dumps({
    "backend": keras.config.backend(),
    "prompt_tokens": gemma_lm.preprocessor.prompt_token_counts(prompts),
    "results": results,
}))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gemma3_270m")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--backend", action="append", choices=("jax", "tensorflow", "torch"))
    args = parser.parse_args()
    print(f"{'backend':<11} {'prompt tokens':>14}  {'call':<28} {'aligned s':>10} {'old s':>7} {'speedup':>8} {'same text':>10}")
    for backend in args.backend or ["jax", "tensorflow", "torch"]:
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
        command = [sys.executable, "-c", MEASURE, args.preset, str(args.new_tokens)]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode:
            print(f"{backend:<11} failed: {(done.stderr.strip().splitlines() or [''])[-1]}")
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        tokens = "+".join(map(str, result["prompt_tokens"]))
        for row in result["results"]:
            aligned, old = row["seconds"]["aligned"], row["seconds"]["old"]
            print(f"{backend:<11} {tokens:>14}  {row['call']:<28} {aligned:>10.2f} {old:>7.2f} "
                  f"{old / aligned:>7.1f}x {str(row['same_text']):>10}")


if __name__ == "__main__":
    main()
