"""The vLLM backend: offline batch generation on GPUs (continuous batching, tensor
parallelism, prefix caching), written against vLLM's documented ``LLM``/``SamplingParams``.

vLLM is the optional ``gpu`` extra and is imported only here, when a step loads a model.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Sequence

from bft_resources.engine.base import Chat, FallbackFormat, Generation, LoadedModel, Sampling
from bft_resources.engine.prompts import prompts_token_ids
from bft_resources.engine.transformers import option_token_ids

_TOP_LOGPROBS = 20

# Every name this backend passes to vLLM, by the callable that takes it. CI checks them
# against the release the `gpu` extra allows (tests/test_packaging.py): when vLLM renames
# one, CI says which.
VLLM_CALLS: dict[str, tuple[str, ...]] = {
    "vllm.LLM": ("model", "tensor_parallel_size", "gpu_memory_utilization", "max_model_len",
                 "enable_prefix_caching", "dtype", "trust_remote_code"),
    "vllm.LLM.generate": ("prompts", "sampling_params", "use_tqdm"),
    "vllm.LLM.get_tokenizer": (),
    "vllm.SamplingParams": ("n", "temperature", "top_p", "max_tokens", "seed", "stop", "logprobs"),
    "vllm.inputs.TokensPrompt": ("prompt_token_ids",),
}  # fmt: skip


def vllm_inputs(tokenizer, chats: Sequence[Chat], fallback: FallbackFormat | None) -> list[dict]:
    """vLLM's ``TokensPrompt`` for each chat (a TypedDict: a plain dict at run time), holding
    the very ids the transformers backend feeds (engine.prompts)."""
    return [{"prompt_token_ids": ids} for ids in prompts_token_ids(tokenizer, chats, fallback)]


def import_vllm():
    try:
        import vllm
    except ImportError as exc:
        raise RuntimeError("the vllm backend needs the gpu extra: pip install 'bft[gpu]'") from exc
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("the vllm backend needs a CUDA GPU; use backend='transformers' on CPU")
    return vllm


class VllmModel(LoadedModel):
    def __init__(
        self,
        path: str,
        reference: str,
        *,
        tensor_parallel_size: int,
        gpu_memory_utilization: float,
        max_model_len: int | None,
        enable_prefix_caching: bool,
        dtype: str,
        trust_remote_code: bool,
        fallback: FallbackFormat | None,
    ):
        vllm = import_vllm()
        self._vllm = vllm
        self.reference = reference
        self.fallback = fallback
        self.llm = vllm.LLM(
            model=path,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            enable_prefix_caching=enable_prefix_caching,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
        )
        self.tokenizer = self.llm.get_tokenizer()

    def special_tokens(self) -> list[str]:
        return sorted(t for t in self.tokenizer.all_special_tokens if t)

    def _params(self, sampling: Sampling, **overrides):
        fields = dict(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                      max_tokens=sampling.max_tokens, seed=sampling.seed, stop=list(sampling.stop))  # fmt: skip
        return self._vllm.SamplingParams(**(fields | overrides))

    def generate(self, chats: Sequence[Chat], sampling: Sampling) -> list[Generation]:
        if not chats:
            return []
        prompts = vllm_inputs(self.tokenizer, chats, self.fallback)
        outputs = self.llm.generate(prompts, sampling_params=self._params(sampling), use_tqdm=False)
        return [
            Generation(
                texts=tuple(o.text for o in out.outputs),
                prompt_tokens=len(out.prompt_token_ids or ()),
                completion_tokens=sum(len(o.token_ids) for o in out.outputs),
                finish_reasons=tuple(o.finish_reason or "stop" for o in out.outputs),
            )
            for out in outputs
        ]

    def option_logprobs(
        self, chats: Sequence[Chat], options: Sequence[str]
    ) -> list[dict[str, float]]:
        if not chats:
            return []
        prompts = vllm_inputs(self.tokenizer, chats, self.fallback)
        params = self._params(Sampling(temperature=0.0, max_tokens=1, n=1), logprobs=_TOP_LOGPROBS)
        variants = option_token_ids(self.tokenizer, options)
        results = []
        for out in self.llm.generate(prompts, sampling_params=params, use_tqdm=False):
            top = out.outputs[0].logprobs[
                0
            ]  # token id -> Logprob, for the first generated position
            results.append({
                option: math.log(sum(math.exp(top[i].logprob) for i in ids if i in top) or 0.0)
                if any(i in top for i in ids) else -math.inf
                for option, ids in variants.items()
            })  # fmt: skip
        return results

    def close(self) -> None:
        import torch

        del self.llm
        gc.collect()
        torch.cuda.empty_cache()
