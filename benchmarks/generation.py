"""Generation throughput: the engine (length-sorted batches, left padding, its dtype choice)
against a naive loop that calls ``model.generate`` one prompt at a time, on the same
backtranslation prompts and model.

    python benchmarks/generation.py [--model smollm2-135m-instruct] [--prompts 32]
        [--batch-size 16] [--max-new-tokens 32] [--device auto]

Prints a table and speed-up ratios: at equal dtype (what batching alone buys) and as each
is configured (the engine picks bf16 on CPUs with native bf16; ``from_pretrained`` gives
fp32). Goal on CPU: >= 5x.

    python benchmarks/generation.py --backend vllm --model meta-llama/Llama-2-7b-hf \
        --prompts 512 --max-new-tokens 256 [--tensor-parallel-size 1]

On a GPU box with the `gpu` extra: backtranslation documents/s and generated tokens/s of the
vLLM backend against the transformers backend on the same GPU, prompts and model, in one run
(Humpback reports 2.5 documents/s per A100 for 7B).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def backtranslation_prompts(count: int) -> list[str]:
    from bft_assets.demo import demo_documents
    from bft_assets.prompts import BACKTRANSLATE

    docs = demo_documents(20, 160)
    return [BACKTRANSLATE.render(response=docs[i % len(docs)]["text"]) for i in range(count)]


def naive_loop(model_dir: str, chats, sampling, device: str, dtype: str) -> tuple[float, int]:
    """The baseline: one prompt, one generate call, no batching."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bft_resources.engine.prompts import render

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = (
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
        .to(device)
        .eval()
    )
    produced = 0
    started = time.perf_counter()
    for chat in chats:
        prompt = render(tokenizer, chat, None)
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(device)
        with torch.inference_mode():
            out = model.generate(
                **inputs,
                do_sample=True,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_new_tokens=sampling.max_tokens,
                pad_token_id=tokenizer.eos_token_id,
            )
        new = out[0, inputs["input_ids"].shape[1] :].tolist()
        produced += next((i for i, t in enumerate(new) if t == tokenizer.eos_token_id), len(new))
    return time.perf_counter() - started, produced


def engine_run(
    model_ref: str, chats, sampling, device: str, batch_size: int, dtype: str,
    backend: str = "transformers", tensor_parallel_size: int = 1,
) -> tuple[float, int]:  # fmt: skip
    from bft_assets.prompts import llama2_inst
    from bft_resources.engine import InferenceEngine

    engine = InferenceEngine(backend=backend, batch_size=batch_size, device=device, dtype=dtype,
                             tensor_parallel_size=tensor_parallel_size)  # fmt: skip
    with engine.load(model_ref, fallback=llama2_inst) as model:
        started = time.perf_counter()
        generations = model.generate(chats, sampling)
        return time.perf_counter() - started, sum(g.completion_tokens for g in generations)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch's default)"
    )
    parser.add_argument("--backend", choices=("transformers", "vllm"), default="transformers",
                        help="vllm: compare the vLLM backend with the transformers one (GPU)")  # fmt: skip
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    args = parser.parse_args()
    if args.backend == "vllm":
        vllm_against_transformers(args)
        return

    import torch

    from bft_resources.engine import Chat, Sampling
    from bft_resources.engine.transformers import pick_device, pick_dtype
    from bft_resources.models import resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    model_dir = str(resolve_model(args.model))
    chats = [Chat(p) for p in backtranslation_prompts(args.prompts)]
    sampling = Sampling(temperature=1.0, top_p=0.9, max_tokens=args.max_new_tokens, seed=0)
    auto = str(pick_dtype("auto", device)).removeprefix("torch.")
    plain = "float32" if device == "cpu" else auto  # what from_pretrained gives a user on CPU
    dtypes = list(dict.fromkeys((plain, auto)))

    engine_run(args.model, chats[:2], sampling, device, args.batch_size, auto)  # warm-up
    runs: dict[tuple[str, str], tuple[float, int]] = {}
    for dtype in dtypes:
        runs["naive", dtype] = naive_loop(model_dir, chats, sampling, device, dtype)
        runs["engine", dtype] = engine_run(
            args.model, chats, sampling, device, args.batch_size, dtype
        )

    print(
        f"model={args.model} device={device} torch_threads={torch.get_num_threads()} "
        f"prompts={len(chats)} max_new_tokens={args.max_new_tokens} engine batch={args.batch_size}"
    )
    print(
        f"{'method':<30} {'dtype':<9} {'seconds':>8} {'prompts/s':>10} {'gen tokens':>11} {'tokens/s':>9}"
    )
    for (method, dtype), (seconds, tokens) in runs.items():
        label = (
            "naive loop, 1 prompt/call" if method == "naive" else "engine, length-sorted batches"
        )
        print(
            f"{label:<30} {dtype:<9} {seconds:>8.2f} {len(chats) / seconds:>10.2f} "
            f"{tokens:>11d} {tokens / seconds:>9.1f}"
        )
    for dtype in dtypes:
        ratio = runs["naive", dtype][0] / runs["engine", dtype][0]
        print(f"speed-up at equal dtype ({dtype}), engine / naive: {ratio:.1f}x")
    overall = runs["naive", plain][0] / runs["engine", auto][0]
    print(f"speed-up as configured, engine ({auto}) / naive ({plain}): {overall:.1f}x")


def vllm_against_transformers(args: argparse.Namespace) -> None:
    """Backtranslation on a GPU: the vLLM backend against the transformers backend."""
    from bft_resources.engine import Chat, Sampling

    chats = [Chat(p) for p in backtranslation_prompts(args.prompts)]
    sampling = Sampling(temperature=1.0, top_p=0.9, max_tokens=args.max_new_tokens, seed=0)
    runs = {}
    for backend in ("transformers", "vllm"):
        engine_run(args.model, chats[:2], sampling, "auto", args.batch_size, "auto", backend,
                   args.tensor_parallel_size)  # fmt: skip  # warm-up (and a first load)
        runs[backend] = engine_run(args.model, chats, sampling, "auto", args.batch_size, "auto",
                                   backend, args.tensor_parallel_size)  # fmt: skip
    print(f"model={args.model} documents={len(chats)} max_new_tokens={args.max_new_tokens} "
          f"tensor_parallel_size={args.tensor_parallel_size}")  # fmt: skip
    print(f"{'backend':<14} {'seconds':>8} {'docs/s':>8} {'gen tokens':>11} {'tokens/s':>9}")
    for backend, (seconds, tokens) in runs.items():
        print(
            f"{backend:<14} {seconds:>8.2f} {len(chats) / seconds:>8.2f} {tokens:>11d} {tokens / seconds:>9.1f}"
        )
    ratio = runs["transformers"][0] / runs["vllm"][0]
    print(f"vllm / transformers: {ratio:.1f}x (Humpback: 2.5 docs/s per A100 for 7B)")


if __name__ == "__main__":
    main()
