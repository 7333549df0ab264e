"""Training throughput: bft's trainer (TRL's SFTTrainer on accelerate, as the assets run it)
against a bare PyTorch loop (forward, backward, AdamW step; no framework) on the same model,
the same examples, the same micro batch and accumulation, in one process.

    python benchmarks/training.py [--model smollm2-135m-instruct] [--data demo|long]
        [--steps 4] [--micro-batch-size 4] [--batch-size 8] [--seq-len 256] [--end-to-end]

--data long: every example is cut to --seq-len exactly (no padding), so both sides do
identical work. --data demo: the demo's 24 seed pairs, tagged as the recipes tag them (short
and of different lengths, as `bft demo` trains them); each micro-batch is padded to its
longest example on both sides, and tokens/s counts the tokens that are not padding.
The first optimizer step of each side is a warm-up and is not timed. Prints a table and the
ratio trainer time / bare-loop time per token (goal: <= 1.2). --end-to-end also times a
whole ``train`` call as the demo runs it (probe set before and after, checkpoint saved).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
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


def demo_examples():
    """The demo's seed pairs with the seed tag line, as seed_only trains them."""
    from bft_assets.demo import demo_seed_path
    from bft_assets.prompts import SEED_TAG
    from bft_resources.trainer import TrainingExample

    rows = [json.loads(line) for line in demo_seed_path().read_text().splitlines() if line]
    return [TrainingExample(f"{r['instruction']}\n{SEED_TAG}", r["response"], "seed") for r in rows]


def trainer_run(model_dir: str, examples, settings, trainer) -> tuple[float, int]:
    """bft's trainer: seconds and non-padding tokens over optimizer steps 2..N."""
    from transformers import TrainerCallback

    from bft_resources.trainer import prepare

    marks: list[tuple[float, int]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append((time.perf_counter(), state.num_input_tokens_seen))

    prepared = prepare(model_dir, examples, settings, trainer, log=lambda line: None)
    sft = prepared.trainer
    # The benchmark times steps, not the step protocol's saving at the end.
    sft.remove_callback(prepared.protocol)
    sft.add_callback(Clock())
    sft.train()
    return marks[-1][0] - marks[0][0], int(marks[-1][1] - marks[0][1])


def bare_loop(model_dir: str, examples, settings, trainer) -> tuple[float, int]:
    """The baseline: the same examples, each micro-batch padded to its longest, forward,
    backward, AdamW; nothing else."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bft_resources.trainer import encode_example

    torch.manual_seed(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    rows = []
    for example in examples:
        ids, mask = encode_example(tokenizer, example)
        ids, mask = ids[: trainer.max_seq_len], mask[: trainer.max_seq_len]
        rows.append((ids, [i if m else -100 for i, m in zip(ids, mask, strict=True)]))
    accumulation = settings.batch_size // trainer.micro_batch_size
    marks: list[tuple[float, int]] = []
    cursor = seen = 0
    for _ in range(settings.max_steps):
        for _ in range(accumulation):
            batch = [rows[(cursor + k) % len(rows)] for k in range(trainer.micro_batch_size)]
            cursor += trainer.micro_batch_size
            width = max(len(ids) for ids, _ in batch)
            fill = [width - len(ids) for ids, _ in batch]
            input_ids = torch.tensor(
                [ids + [pad] * n for (ids, _), n in zip(batch, fill, strict=True)]
            )
            labels = torch.tensor(
                [lab + [-100] * n for (_, lab), n in zip(batch, fill, strict=True)]
            )
            attention = torch.tensor(
                [[1] * len(ids) + [0] * n for (ids, _), n in zip(batch, fill, strict=True)]
            )
            seen += sum(len(ids) for ids, _ in batch)
            loss = (
                model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
                / accumulation
            )
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        marks.append((time.perf_counter(), seen))
    return marks[-1][0] - marks[0][0], marks[-1][1] - marks[0][1]  # fmt: skip


def end_to_end(model_dir: str, examples, settings, trainer) -> float:
    """Seconds of a whole ``train`` call: load, probe set before, steps, probe set and
    checkpoint at each declared step."""
    from bft_resources.trainer import train

    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        train(model_dir, examples, f"{folder}/ckpt", settings, trainer, base_reference="bench",
              log=lambda line: None)  # fmt: skip
        return time.perf_counter() - started


def main() -> None:
    import torch

    from bft_resources.models import resolve_model
    from bft_resources.trainer import Trainer, TrainingSettings

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", choices=["demo", "long"], default="demo")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--fused-lm-head", action="store_true",
                        help="TRL's fused LM head (the GPU default) instead of the model's own loss")  # fmt: skip
    parser.add_argument("--end-to-end", action="store_true",
                        help="also time a whole train call with the demo's protocol (3 steps)")  # fmt: skip
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first is a warm-up)")
    model_dir = str(resolve_model(args.model))
    settings = TrainingSettings(
        learning_rate=1e-5, steps=[args.steps], batch_size=args.batch_size, dropout=0.0
    )
    trainer = Trainer(micro_batch_size=args.micro_batch_size, max_seq_len=args.seq_len, bf16=False,
                      gradient_checkpointing=False, fused_lm_head=args.fused_lm_head)  # fmt: skip
    examples = demo_examples() if args.data == "demo" else long_examples(64)
    runs = {"bare PyTorch loop": bare_loop(model_dir, examples, settings, trainer),
            "bft trainer (TRL SFTTrainer)": trainer_run(model_dir, examples, settings, trainer)}  # fmt: skip
    print(
        f"model={args.model} data={args.data} torch_threads={torch.get_num_threads()} "
        f"steps={args.steps} (first not timed) batch={args.batch_size} "
        f"micro_batch={args.micro_batch_size} max_seq_len={args.seq_len} fp32 "
        f"no gradient checkpointing fused_lm_head={args.fused_lm_head}"
    )
    print(f"| {'run':<30} | {'seconds':>8} | {'tokens':>7} | {'tokens/s':>9} |")
    print(f"|{'-' * 32}|{'-' * 10}|{'-' * 9}|{'-' * 11}|")
    for name, (seconds, tokens) in runs.items():
        print(f"| {name:<30} | {seconds:>8.1f} | {tokens:>7} | {tokens / seconds:>9.1f} |")
    (bare_s, bare_t), (ours_s, ours_t) = runs.values()
    ratio = (ours_s / ours_t) / (bare_s / bare_t)
    print(f"trainer time per token / bare loop: {ratio:.2f}x (goal <= 1.2x)")
    if args.end_to_end:
        demo = settings.model_copy(update={"steps": [3]})
        seconds = end_to_end(model_dir, examples, demo, trainer)
        print(f"whole train call, 3 steps (probe set, checkpoint saved): {seconds:.1f} s, "
              f"{seconds / 3:.1f} s per step")  # fmt: skip


if __name__ == "__main__":
    main()
