"""OpenMP's wait policy on a shared CPU: torch's default (threads spin at each barrier) against
``OMP_WAIT_POLICY=PASSIVE`` (they sleep), each on a quiet machine and beside one busy process
(a browser tab, another job: what a laptop or a 2-core CI runner always has).

    python benchmarks/cpu_wait_policy.py [--threads 2] [--steps 24] [--busy 1]

Each cell is a fresh process (the policy is read once, when torch's OpenMP runtime starts) on
random weights of SmolLM2-135M's shape, fp32: a prefill of 5 x 128 tokens (best of 3), greedy decoding
of --steps tokens for 5 rows, and one training step (forward, backward, AdamW) of 2 x 128
tokens (best of 2 after one untimed). Prints a table and each policy's time against the default's, measured in one run.
``bft`` sets PASSIVE for its own commands and the Makefile for make's (a user's setting wins).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CELL = r"""
import json, sys, time, torch
from transformers import LlamaConfig, LlamaForCausalLM
steps = int(sys.argv[1])
torch.manual_seed(0)
config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                     tie_word_embeddings=True, max_position_embeddings=2048)
model = LlamaForCausalLM(config).float()
ids = torch.randint(0, config.vocab_size, (5, 128))
timed = {}
with torch.inference_mode():
    model.eval()
    model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
    prefills = []
    for _ in range(3):
        began = time.perf_counter()
        model(ids)
        prefills.append(time.perf_counter() - began)
    timed["prefill_s"] = min(prefills)
    began = time.perf_counter()
    model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0)
    timed["decode_step_s"] = (time.perf_counter() - began - timed["prefill_s"]) / steps
model.train()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
batch = ids[:2]
trained = []
for i in range(3):  # the first step allocates the optimizer state: not timed
    began = time.perf_counter()
    model(batch, labels=batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    trained.append(time.perf_counter() - began)
timed["train_step_s"] = min(trained[1:])
print(json.dumps(timed))
"""


def cell(policy: str | None, threads: int, steps: int, busy: int) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["OMP_NUM_THREADS"] = str(threads)
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        time.sleep(0.5 if busy else 0)
        out = subprocess.run(
            [sys.executable, "-c", CELL, str(steps)], env=env, capture_output=True, text=True,
            check=True,
        )  # fmt: skip
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument(
        "--busy", type=int, default=1, help="busy processes beside the loaded cells"
    )
    args = parser.parse_args()
    rows = []
    for load, busy in (("quiet", 0), (f"{args.busy} busy process(es)", args.busy)):
        for policy in (None, "PASSIVE"):
            rows.append(
                (load, policy or "default (spin)", cell(policy, args.threads, args.steps, busy))
            )
    keys = ("prefill_s", "decode_step_s", "train_step_s")
    print(f"{args.threads} torch threads, SmolLM2-135M shape, random weights, fp32\n")
    print(f"| machine | OMP wait policy | {' | '.join(keys)} |")
    print("|---|---|" + "---|" * len(keys))
    for load, policy, timed in rows:
        print(f"| {load} | {policy} | " + " | ".join(f"{timed[k]:.3f}" for k in keys) + " |")
    print("\nPASSIVE time / default time (below 1: PASSIVE is faster)")
    for i in (0, 2):
        load, base, passive = rows[i][0], rows[i][2], rows[i + 1][2]
        print(f"  {load}: " + ", ".join(f"{k} {passive[k] / base[k]:.2f}x" for k in keys))


if __name__ == "__main__":
    main()
