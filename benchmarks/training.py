"""Training throughput: bft's trainer (TRL's SFTTrainer on accelerate, as the assets run it)
against a bare PyTorch loop (forward, backward, AdamW step; no framework) on the same model,
the same examples cut to the same length, the same micro batch and accumulation, in one run.

    python benchmarks/training.py [--model smollm2-135m-instruct] [--steps 5]
        [--micro-batch-size 4] [--batch-size 8] [--seq-len 256]

Every example fills --seq-len exactly (no padding), so both sides do identical work. The
first optimizer step of each is a warm-up and is not timed. Prints a table and the ratio
trainer time / bare-loop time per token (goal: <= 1.2).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def long_examples(count: int):
    """Training pairs whose rendering exceeds any benchmark length: each is cut to --seq-len."""
    from bft_assets.demo import demo_documents
    from bft_resources.trainer import TrainingExample

    docs = demo_documents(20, 400)
    text = " ".join(d["text"] for d in docs)
    return [
        TrainingExample(f"Summarize part {i}.", text[i * 50 :] + text[: i * 50], "seed")
        for i in range(count)
    ]


def trainer_run(model_dir: str, examples, hp) -> tuple[float, int]:
    """bft's trainer: seconds and tokens over optimizer steps 2..N."""
    from transformers import TrainerCallback

    from bft_resources.trainer import prepare

    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append(time.perf_counter())

    prepared = prepare(model_dir, examples, hp, log=lambda line: None)
    trainer = prepared.trainer
    # The benchmark times steps, not the step protocol's saving at the end.
    trainer.remove_callback(prepared.protocol)
    trainer.add_callback(Clock())
    trainer.train()
    tokens_per_step = hp.batch_size * hp.max_seq_len
    return marks[-1] - marks[0], tokens_per_step * (len(marks) - 1)


def bare_loop(model_dir: str, examples, hp) -> tuple[float, int]:
    """The baseline: the same tokens, forward, backward, AdamW; nothing else."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bft_resources.trainer import encode_example

    torch.manual_seed(hp.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=hp.learning_rate, weight_decay=hp.weight_decay
    )
    rows = []
    for example in examples:
        ids, mask = encode_example(tokenizer, example)
        ids, mask = ids[: hp.max_seq_len], mask[: hp.max_seq_len]
        rows.append(([i if m else -100 for i, m in zip(ids, mask, strict=True)], ids))
    accumulation = hp.batch_size // hp.micro_batch_size
    marks: list[float] = []
    cursor = 0
    for _ in range(hp.max_steps):
        for _ in range(accumulation):
            batch = [rows[(cursor + k) % len(rows)] for k in range(hp.micro_batch_size)]
            cursor += hp.micro_batch_size
            input_ids = torch.tensor([ids for _, ids in batch])
            labels = torch.tensor([lab for lab, _ in batch])
            loss = model(input_ids=input_ids, labels=labels).loss / accumulation
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        marks.append(time.perf_counter())
    tokens_per_step = hp.batch_size * hp.max_seq_len
    return marks[-1] - marks[0], tokens_per_step * (len(marks) - 1)


def main() -> None:
    import torch

    from bft_resources.models import resolve_model
    from bft_resources.trainer import Hyperparameters

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--fused-lm-head", action="store_true",
                        help="TRL's fused LM head (the GPU default) instead of the model's own loss")  # fmt: skip
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first is a warm-up)")
    model_dir = str(resolve_model(args.model))
    hp = Hyperparameters(learning_rate=1e-5, steps=(args.steps,), batch_size=args.batch_size,
                         micro_batch_size=args.micro_batch_size, max_seq_len=args.seq_len, dropout=0.0,
                         bf16=False, gradient_checkpointing=False, fused_lm_head=args.fused_lm_head)  # fmt: skip
    examples = long_examples(64)
    runs = {"bare PyTorch loop": bare_loop(model_dir, examples, hp),
            "bft trainer (TRL SFTTrainer)": trainer_run(model_dir, examples, hp)}  # fmt: skip
    print(
        f"model={args.model} torch_threads={torch.get_num_threads()} steps={args.steps} "
        f"(first not timed) batch={args.batch_size} micro_batch={args.micro_batch_size} "
        f"seq_len={args.seq_len} fp32 no gradient checkpointing fused_lm_head={args.fused_lm_head}"
    )
    print(f"| {'run':<30} | {'seconds':>8} | {'tokens':>7} | {'tokens/s':>9} |")
    print(f"|{'-' * 32}|{'-' * 10}|{'-' * 9}|{'-' * 11}|")
    for name, (seconds, tokens) in runs.items():
        print(f"| {name:<30} | {seconds:>8.1f} | {tokens:>7} | {tokens / seconds:>9.1f} |")
    (bare_s, bare_t), (ours_s, ours_t) = runs.values()
    ratio = (ours_s / ours_t) / (bare_s / bare_t)
    print(f"trainer time per token / bare loop: {ratio:.2f}x (goal <= 1.2x)")


if __name__ == "__main__":
    main()
