"""The inference engine resource: pick a backend by configuration, load a model per step."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import dagster as dg
from pydantic import Field

from bft_resources.engine.base import (
    Chat,
    FallbackFormat,
    Generation,
    LoadedModel,
    LogprobsUnavailable,
    Sampling,
)
from bft_resources.models import ModelResource

__all__ = [
    "Chat",
    "Generation",
    "InferenceEngine",
    "LoadedModel",
    "LogprobsUnavailable",
    "Sampling",
]


class InferenceEngine(dg.ConfigurableResource):
    """How models run: ``transformers`` (CPU, or GPU without vLLM), ``vllm`` (GPUs) or
    ``endpoint`` (an OpenAI-compatible server)."""

    backend: Literal["transformers", "vllm", "endpoint"] = Field(
        default="transformers",
        description="transformers (CPU/GPU), vllm (GPU) or endpoint (OpenAI-compatible).",
    )
    batch_size: int = Field(default=8, description="transformers: prompts per generate call.")
    device: str = Field(default="auto", description="transformers: cpu, cuda, cuda:1 ... or auto.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="auto: bf16 on GPUs and CPUs that compute it natively, else fp16 (GPU) / fp32 (CPU).",
    )
    tensor_parallel_size: int = Field(default=1, description="vllm: GPUs one model spreads over.")
    gpu_memory_utilization: float = Field(
        default=0.9, description="vllm: share of GPU memory it may take."
    )
    max_model_len: int | None = Field(
        default=None, description="vllm: context length (default: the model's)."
    )
    enable_prefix_caching: bool = Field(
        default=True, description="vllm: reuse the KV cache of shared prefixes."
    )
    base_url: str | None = Field(
        default=None, description="endpoint: e.g. http://127.0.0.1:8000/v1"
    )
    api_key: str | None = Field(
        default=None, description="endpoint: key, set it with EnvVar; never logged."
    )
    served_model: str | None = Field(
        default=None, description="endpoint: model name on the server."
    )
    max_concurrency: int = Field(default=8, description="endpoint: requests in flight at once.")
    max_retries: int = Field(default=5, description="endpoint: retries on 429/5xx/timeouts.")
    timeout_s: float = Field(default=120.0, description="endpoint: seconds per request.")
    retry_backoff_s: float = Field(
        default=0.5, description="endpoint: first retry delay, doubled each retry, jittered."
    )
    trust_remote_code: bool = Field(default=False, description="Run code shipped with a model.")

    def _open(self, model: ModelResource, fallback: FallbackFormat | None) -> LoadedModel:
        if self.backend == "endpoint":
            from bft_resources.engine.endpoint import EndpointClient, EndpointModel

            if not self.base_url:
                raise ValueError("the endpoint backend needs base_url")
            client = EndpointClient(
                self.base_url, self.api_key, self.max_concurrency, self.max_retries, self.timeout_s,
                backoff_s=self.retry_backoff_s,
            )  # fmt: skip
            return EndpointModel(client, self.served_model or model.model)
        # The whole reference, revision and storage included, decides what is loaded.
        path = str(model.local_path())
        if self.backend == "vllm":
            from bft_resources.engine.vllm import VllmModel

            return VllmModel(
                path,
                model.reference,
                tensor_parallel_size=self.tensor_parallel_size,
                gpu_memory_utilization=self.gpu_memory_utilization,
                max_model_len=self.max_model_len,
                enable_prefix_caching=self.enable_prefix_caching,
                dtype=self.dtype,
                trust_remote_code=self.trust_remote_code or model.trust_remote_code,
                fallback=fallback,
            )
        from bft_resources.engine.transformers import TransformersModel

        return TransformersModel(
            path,
            model.reference,
            self.device,
            self.dtype,
            self.batch_size,
            self.trust_remote_code or model.trust_remote_code,
            fallback,
        )

    @contextlib.contextmanager
    def load(
        self, model: ModelResource | str, fallback: FallbackFormat | None = None
    ) -> Iterator[LoadedModel]:
        """The model, loaded once for a step and released when the block ends. ``fallback``
        renders a message for a model without a chat template."""
        reference = model if isinstance(model, ModelResource) else ModelResource(model=model)
        loaded = self._open(reference, fallback)
        try:
            yield loaded
        finally:
            loaded.close()
