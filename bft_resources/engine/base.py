"""The inference engine: one interface, three backends (transformers, vllm, endpoint).

A stage loads a model once (``InferenceEngine.load``), sends whole lists of chats to it and
releases it when the step ends. The engine renders chats with the model's own chat
template; it never knows the method's prompts: callers hand it finished messages.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

# A rendering for models that have no chat template (the caller's choice, e.g. Llama-2's).
FallbackFormat = Callable[[str], str]


@dataclass(frozen=True)
class Sampling:
    """Sampling settings for one call (vLLM's SamplingParams, in the engine's own terms)."""

    temperature: float = 1.0
    top_p: float = 0.9
    max_tokens: int = 256
    n: int = 1
    seed: int | None = 0
    stop: tuple[str, ...] = ()

    def fingerprint(self) -> str:
        """A short stable text for code versions: changes whenever a setting does."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:8]

    def describe(self) -> str:
        return f"T={self.temperature},top_p={self.top_p},max={self.max_tokens},n={self.n},seed={self.seed}"


@dataclass(frozen=True)
class Chat:
    """One request: a user message, optionally a system message before it (an annotator's
    instructions) and the start of the assistant's reply (forcing a format, e.g. a reply
    that opens with a marker)."""

    user: str
    assistant_prefix: str = ""
    system: str = ""

    def messages(self) -> list[dict[str, str]]:
        """The chat as role/content messages (without the assistant prefix)."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, {"role": "user", "content": self.user}]


@dataclass(frozen=True)
class Generation:
    texts: tuple[str, ...]  # n samples
    prompt_tokens: int
    completion_tokens: int  # over all n samples
    finish_reasons: tuple[str, ...] = field(default=())

    @property
    def text(self) -> str:
        return self.texts[0]


class LogprobsUnavailable(RuntimeError):
    """The backend cannot return token log-probabilities (e.g. a server that ignores them)."""


class LoadedModel(ABC):
    """A model loaded by a backend, for the duration of one step."""

    reference: str

    @abstractmethod
    def generate(self, chats: Sequence[Chat], sampling: Sampling) -> list[Generation]:
        """One Generation per chat, in the order given."""

    @abstractmethod
    def option_logprobs(
        self, chats: Sequence[Chat], options: Sequence[str]
    ) -> list[dict[str, float]]:
        """For each chat, the log-probability that the next token starts each option
        (variants with and without a leading space are summed); -inf where it cannot."""

    def special_tokens(self) -> list[str]:
        """Control strings of the model's tokenizer that text must not smuggle in."""
        return []

    def close(self) -> None:  # noqa: B027 - backends with nothing to free keep the default
        """Free the model's memory."""
