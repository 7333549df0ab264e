"""Inference engines: one ``Engine`` subclass per backend, picked by ``backend``.

    engine: {backend: transformers, batch_size: 8}
    engine: {backend: vllm, tensor_parallel_size: 8}
    engine: {backend: endpoint, base_url: https://api.openai.com/v1, api_key_env: OPENAI_API_KEY}

A new backend is one module with one ``Engine`` subclass, added to ``EngineSpec``.
"""

from typing import Annotated

from pydantic import Field, TypeAdapter

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

EngineSpec = Annotated[
    TransformersEngine | VllmEngine | EndpointEngine, Field(discriminator="backend")
]
BACKENDS = ("transformers", "vllm", "endpoint")


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
