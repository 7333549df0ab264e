"""Inference engines: one ``Engine`` subclass per backend, picked by ``backend``.

    engine: {backend: transformers, batch_size: 8}
    engine: {backend: vllm, tensor_parallel_size: 8}
    engine: {backend: endpoint, base_url: https://api.openai.com/v1, api_key_env: OPENAI_API_KEY}

A new backend is one module with one ``Engine`` subclass, added to ``EngineSpec``.
"""

from pydantic import TypeAdapter

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


# One union, no discriminator field required: each backend's `backend` is a Literal with a
# default and unknown settings are forbidden, so pydantic's smart union picks the one backend
# a declaration fits; with no `backend` that is transformers (the first that fits).
EngineSpec = TransformersEngine | VllmEngine | EndpointEngine
OptionalEngineSpec = TransformersEngine | VllmEngine | EndpointEngine | None


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
    "OptionalEngineSpec",
    "Sampling",
    "TransformersEngine",
    "VllmEngine",
    "engine_from",
]
