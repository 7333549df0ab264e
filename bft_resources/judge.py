"""The judge: a model that compares two answers, run locally or behind an OpenAI-compatible
endpoint (OpenAI, a vLLM server, ``transformers serve``). It loads through the inference
engine's backends; the method (prompt, verdict reading) lives with the evaluation asset."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import dagster as dg
from pydantic import Field

from bft_resources.engine import InferenceEngine, LoadedModel
from bft_resources.models import ModelResource


class Judge(dg.ConfigurableResource):
    backend: Literal["local", "endpoint"] = Field(
        default="local", description="A local model, or an endpoint."
    )
    model: ModelResource = Field(
        description="local: the model to load; endpoint: its ``model`` is the served model's name."
    )
    base_url: str | None = Field(
        default=None, description="endpoint: e.g. https://api.openai.com/v1"
    )
    api_key: str | None = Field(
        default=None, description="endpoint: key; bind with EnvVar, never logged."
    )
    max_concurrency: int = Field(default=8, description="endpoint: requests in flight.")
    max_retries: int = Field(
        default=5, description="endpoint: retries on 429/5xx/timeouts, with backoff and jitter."
    )
    timeout_s: float = Field(default=120.0, description="endpoint: seconds per request.")
    retry_backoff_s: float = Field(default=0.5, description="endpoint: first retry delay.")
    batch_size: int = Field(default=8, description="local: prompts per forward pass.")

    @property
    def reference(self) -> str:
        return f"{self.backend}:{self.model.reference}"

    @contextlib.contextmanager
    def load(self) -> Iterator[LoadedModel]:
        if self.backend == "endpoint":
            engine = InferenceEngine(
                backend="endpoint", base_url=self.base_url, api_key=self.api_key, served_model=self.model.model,
                max_concurrency=self.max_concurrency, max_retries=self.max_retries, timeout_s=self.timeout_s,
                retry_backoff_s=self.retry_backoff_s,
            )  # fmt: skip
        else:
            engine = InferenceEngine(backend="transformers", batch_size=self.batch_size)
        with engine.load(self.model) as model:
            yield model
