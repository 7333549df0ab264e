"""Generation throughput: the engine (length-sorted batches, left padding, its dtype choice)
against a naive loop that calls ``model.generate`` one prompt at a time, on the same
backtranslation prompts and model.

    python benchmarks/generation.py [--model smollm2-135m-instruct] [--prompts 32]
        [--batch-size 16] [--max-new-tokens 32] [--device auto]

Prints a table and speed-up ratios: at equal dtype (what batching alone buys) and as each
is configured (the engine picks bf16 on CPUs with native bf16; ``from_pretrained`` gives
fp32). Goal on CPU: >= 5x.

    .venv-vllm/bin/python benchmarks/generation.py --backend vllm     # make install-vllm first

The vLLM backend against the transformers backend (batched) and the naive loop, in one run
at one dtype (``--dtype``, float32 by default: bf16 is emulated on CPUs without AVX-512 BF16),
greedy, 64 new tokens by default: generated and prefill tokens/s of each, the ratios, and the
engine's start time with its engine core in this process (the CPU default) and in a process
of its own (vLLM's default, the GPU one). Goal on a CPU: vLLM >= 10x the naive loop and >=
1.5x transformers, a start <= 30 s (eager). On a GPU box with the `gpu` extra:

    python benchmarks/generation.py --backend vllm --model meta-llama/Llama-2-7b-hf \
        --dtype bfloat16 --prompts 512 --max-new-tokens 256 [--tensor-parallel-size 1] [--skip-naive]
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def backtranslation_prompts(count: int) -> list[str]:
    from bft_assets.demo import demo_documents
    from bft_assets.prompts import BACKTRANSLATE

    docs = demo_documents(20, 160)
    return [BACKTRANSLATE.render(response=docs[i % len(docs)]["text"]) for i in range(count)]


def distinct_prompts(*counts: int) -> list[list[str]]:
    """Lists of backtranslation prompts (~250 SmolLM2 tokens each) of these sizes, no document
    in two lists: a prompt measured twice would find its KV cache in vLLM's prefix cache the
    second time."""
    from bft_assets.demo import demo_documents
    from bft_assets.prompts import BACKTRANSLATE

    docs = demo_documents(75, 145)
    if len(docs) < sum(counts):
        raise SystemExit(f"{len(docs)} demo documents of 75-145 words, {sum(counts)} needed")
    prompts = [BACKTRANSLATE.render(response=d["text"]) for d in docs]
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return [prompts[start : start + count] for start, count in zip(starts, counts, strict=True)]


def naive_loop(model_dir: str, chats, sampling, device: str, dtype: str) -> tuple[float, int]:
    """The baseline: one prompt, one generate call, no batching (sampled, or greedy at
    temperature 0). Returns the seconds and the tokens generated before EOS."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bft_resources.engine.rendering import prompt_token_ids

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = (
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
        .to(device)
        .eval()
    )
    sample = sampling.temperature > 0
    how = {"temperature": sampling.temperature, "top_p": sampling.top_p} if sample else {}
    produced = 0
    started = time.perf_counter()
    for chat in chats:
        ids = torch.tensor([prompt_token_ids(tokenizer, chat, None)], device=device)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=sample,
                max_new_tokens=sampling.max_tokens,
                pad_token_id=tokenizer.eos_token_id,
                **how,
            )
        new = out[0, ids.shape[1] :].tolist()
        produced += next((i for i, t in enumerate(new) if t == tokenizer.eos_token_id), len(new))
    return time.perf_counter() - started, produced


def engine_run(
    model_ref: str, chats, sampling, device: str, batch_size: int, dtype: str
) -> tuple[float, int]:
    from bft_assets.prompts import llama2_inst
    from bft_resources.engine import TransformersEngine

    engine = TransformersEngine(batch_size=batch_size, device=device, dtype=dtype)
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
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="32 (transformers), 64 (--backend vllm)")  # fmt: skip
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch's default)"
    )
    parser.add_argument("--backend", choices=("transformers", "vllm"), default="transformers",
                        help="vllm: the vLLM backend against the transformers backend and the naive loop")  # fmt: skip
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="--backend vllm: the one dtype of every method")  # fmt: skip
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--skip-naive", action="store_true", help="--backend vllm: no naive loop (a 7B on a GPU)")  # fmt: skip
    args = parser.parse_args()
    if args.backend == "vllm":
        args.max_new_tokens = args.max_new_tokens or 64
        vllm_against_transformers(args)
        return
    args.max_new_tokens = args.max_new_tokens or 32

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


@dataclass
class Measured:
    method: str
    start_s: float | None  # loading the model (None: not an engine)
    prefill_s: float  # the prefill set, one new token each
    prefill_tokens: int  # prompt tokens of the prefill set
    generate_s: float  # the generation set, max_new_tokens each
    prompt_tokens: int  # prompt tokens of the generation set
    generated_tokens: int
    texts: list[str] = field(default_factory=list)

    @property
    def prefill_rate(self) -> float:
        return self.prefill_tokens / self.prefill_s

    @property
    def rate(self) -> float:
        """Generated tokens per second of the whole call, its prefill included."""
        return self.generated_tokens / self.generate_s

    @property
    def decode_rate(self) -> float:
        """Generated tokens per second of decoding: the call less its prompts' prefill
        (at the prefill rate measured on the other prompts)."""
        return self.generated_tokens / (self.generate_s - self.prompt_tokens / self.prefill_rate)

    def row(self, prompts: int) -> str:
        start = f"{self.start_s:.1f}" if self.start_s is not None else "-"
        return (f"{self.method:<34} {start:>7} {self.prefill_rate:>11.1f} {self.generate_s:>7.1f} "
                f"{self.generated_tokens:>6d} {self.rate:>9.1f} {self.decode_rate:>10.1f} "
                f"{prompts / self.generate_s:>7.2f}")  # fmt: skip


def measure_engine(method: str, engine, model: str, sets, sampling) -> Measured:
    """Load (timed), warm up, prefill (one token per prompt of the prefill set), generate."""
    from bft_assets.prompts import llama2_inst
    from bft_resources.engine import Sampling

    generate_set, prefill_set, warm_up = sets
    started = time.perf_counter()
    with engine.load(model, fallback=llama2_inst) as loaded:
        start = time.perf_counter() - started
        loaded.generate(warm_up, sampling)
        began = time.perf_counter()
        firsts = loaded.generate(prefill_set, Sampling(temperature=0.0, max_tokens=1))
        prefill = time.perf_counter() - began
        began = time.perf_counter()
        generations = loaded.generate(generate_set, sampling)
        seconds = time.perf_counter() - began
    return Measured(method, start, prefill, sum(g.prompt_tokens for g in firsts), seconds,
                    sum(g.prompt_tokens for g in generations), sum(g.completion_tokens for g in generations),
                    [g.text for g in generations])  # fmt: skip


def measure_naive(model: str, sets, sampling, device: str, dtype: str) -> Measured:
    from bft_resources.engine import Sampling
    from bft_resources.engine.rendering import prompts_token_ids
    from bft_resources.models import ModelRef

    generate_set, prefill_set, _ = sets
    reference = ModelRef(model=model)
    path, tokenizer = str(reference.local_path()), reference.tokenizer()
    count = lambda chats: sum(len(ids) for ids in prompts_token_ids(tokenizer, chats, None))  # noqa: E731
    first = Sampling(temperature=0.0, max_tokens=1)
    prefill, _ = naive_loop(path, prefill_set, first, device, dtype)
    seconds, produced = naive_loop(path, generate_set, sampling, device, dtype)
    return Measured("naive loop, 1 prompt/generate call", None, prefill, count(prefill_set), seconds,
                    count(generate_set), produced)  # fmt: skip


def vllm_against_transformers(args: argparse.Namespace) -> None:
    """The vLLM backend, the transformers backend and the naive loop, at one dtype."""
    import torch

    from bft_resources.engine import Chat, Sampling, TransformersEngine, VllmEngine
    from bft_resources.engine.transformers import pick_device
    from bft_resources.engine.vllm import import_vllm, vllm_platform

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    device = pick_device(args.device)
    generate_set, prefill_set, warm_up = distinct_prompts(args.prompts, args.prompts, 2)
    sets = tuple([Chat(p) for p in prompts] for prompts in (generate_set, prefill_set, warm_up))
    greedy = Sampling(temperature=0.0, max_tokens=args.max_new_tokens)
    runs = []
    if not args.skip_naive:
        runs.append(measure_naive(args.model, sets, greedy, device, args.dtype))
    transformers = TransformersEngine(batch_size=args.batch_size, device=device, dtype=args.dtype)
    label = f"transformers engine (batch {args.batch_size})"
    runs.append(measure_engine(label, transformers, args.model, sets, greedy))
    began = time.perf_counter()
    import_vllm()  # once per process, apart from the engine's start
    imported, platform = time.perf_counter() - began, vllm_platform()
    placements = {}
    for separate in (False, True):
        engine = VllmEngine(dtype=args.dtype, tensor_parallel_size=args.tensor_parallel_size,
                            separate_process=separate)  # fmt: skip
        label = f"vLLM engine (core {'own process' if separate else 'in process'})"
        placements[separate] = measure_engine(label, engine, args.model, sets, greedy)
        runs.append(placements[separate])
    # bft's default placement on this platform: in process on a CPU, its own on a GPU
    vllm = placements[VllmEngine().uses_separate_process(platform)]

    print(f"model={args.model} dtype={args.dtype} vLLM platform={platform} transformers device={device} "
          f"torch threads={threads} prompts={len(generate_set)} (mean {runs[-1].prompt_tokens / len(generate_set):.0f} "
          f"tokens) max_new_tokens={args.max_new_tokens} greedy; vLLM import {imported:.1f} s (once)")  # fmt: skip
    print(f"{'method':<34} {'start s':>7} {'prefill t/s':>11} {'gen s':>7} {'tokens':>6} {'gen tok/s':>9} "
          f"{'decode t/s':>10} {'docs/s':>7}")  # fmt: skip
    for run in runs:
        print(run.row(len(generate_set)))
    same = sum(a == b for a, b in zip(vllm.texts, runs[-3].texts, strict=True))
    print(
        f"{vllm.method}: replies equal to the transformers engine's on {same}/{len(generate_set)} prompts"
    )
    for other in runs[:-2]:
        print(f"{vllm.method} / {other.method}: generated tokens/s {vllm.rate / other.rate:.1f}x "
              f"(decode {vllm.decode_rate / other.decode_rate:.1f}x), prefill tokens/s "
              f"{vllm.prefill_rate / other.prefill_rate:.1f}x")  # fmt: skip
    goals = [f"vs transformers {vllm.rate / runs[-3].rate:.1f}x (goal >= 1.5x)",
             f"start {placements[False].start_s:.1f} s in process, {placements[True].start_s:.1f} s own process "
             "(goal <= 30 s eager)"]  # fmt: skip
    if not args.skip_naive:
        goals.insert(0, f"vs naive {vllm.rate / runs[0].rate:.1f}x (goal >= 10x)")
    print("goals: " + "; ".join(goals))


if __name__ == "__main__":
    main()
