"""Inference engines: one ``Engine`` subclass per backend, picked by ``backend``.

    engine: {backend: transformers, batch_size: 8}
    engine: {backend: vllm, tensor_parallel_size: 8}
    engine: {backend: endpoint, base_url: https://api.openai.com/v1, api_key_env: OPENAI_API_KEY}

A new backend is one module with one ``Engine`` subclass, added to ``EngineSpec``.
"""

from typing import Annotated, Any

from pydantic import Discriminator, Tag, TypeAdapter

from bft_resources.engine.base import (
    Chat,
    Engine,
    FallbackFormat,
    Generation,
    LoadedModel,
    LogprobsUnavailable,
    Sampling,
)
from bft_resources.engine.endpoint import EndpointEngine
from bft_resources.engine.transformers import TransformersEngine
from bft_resources.engine.vllm import VllmEngine

BACKENDS = ("transformers", "vllm", "endpoint")


def _backend(value: Any) -> str:
    """The backend a declaration names; transformers where it names none."""
    found = value.get("backend") if isinstance(value, dict) else getattr(value, "backend", None)
    return found or "transformers"


EngineSpec = Annotated[
    Annotated[TransformersEngine, Tag("transformers")]
    | Annotated[VllmEngine, Tag("vllm")]
    | Annotated[EndpointEngine, Tag("endpoint")],
    Discriminator(_backend),
]


def engine_from(value: object) -> Engine:
    """An engine from its declaration (a mapping with ``backend``) or an engine itself."""
    return TypeAdapter(EngineSpec).validate_python(value)


__all__ = [
    "BACKENDS",
    "Chat",
    "EndpointEngine",
    "Engine",
    "EngineSpec",
    "FallbackFormat",
    "Generation",
    "LoadedModel",
    "LogprobsUnavailable",
    "Sampling",
    "TransformersEngine",
    "VllmEngine",
    "engine_from",
]
