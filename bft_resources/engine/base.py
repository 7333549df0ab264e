"""The inference engine: one interface, one subclass per backend (``transformers``,
``vllm``, ``endpoint``), each in a module of its own.

A stage loads a model once (``Engine.load``), sends whole lists of chats to it and releases
it when the step ends. The engine renders chats with the model's own chat template; it never
knows the method's prompts: callers hand it finished messages.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace

import dagster as dg
from pydantic import ConfigDict, model_validator

from bft_resources.bounds import check_bounds
from bft_resources.models import ModelRef

# A rendering for models that have no chat template (the caller's choice, e.g. Llama-2's).
FallbackFormat = Callable[[str], str]
Log = Callable[[str], None]
_log = logging.getLogger("bft.engine")


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


def per_chat(sampling: Sampling | Sequence[Sampling], chats: int) -> list[Sampling]:
    """One Sampling per chat: a single one shared, or one each (e.g. a token cap per row)."""
    if isinstance(sampling, Sampling):
        return [sampling] * chats
    samplings = list(sampling)
    if len(samplings) != chats:
        raise ValueError(f"{len(samplings)} samplings for {chats} chats")
    return samplings


def same_but_length(samplings: Sequence[Sampling]) -> Sampling:
    """The settings a batch shares when only ``max_tokens`` may differ per chat (the longest
    cap stands for the batch; each reply is cut to its own afterwards)."""
    longest = max(s.max_tokens for s in samplings)
    shared = {replace(s, max_tokens=longest) for s in samplings}
    if len(shared) != 1:
        raise ValueError("chats of one call may differ in max_tokens only")
    return shared.pop()


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
    def generate(
        self, chats: Sequence[Chat], sampling: Sampling | Sequence[Sampling]
    ) -> list[Generation]:
        """One Generation per chat, in the order given; ``sampling`` is shared or per chat."""

    @abstractmethod
    def option_logprobs(
        self, chats: Sequence[Chat], options: Sequence[str]
    ) -> list[dict[str, float]]:
        """For each chat, the exact log-probability that the next token starts each option
        (variants with and without a leading space are summed); -inf where no token spells
        the option."""

    def prompt_tokens(self, chats: Sequence[Chat]) -> list[int]:
        """How many tokens each chat takes once rendered (a cap on the reply follows it)."""
        raise NotImplementedError(f"{type(self).__name__} cannot count prompt tokens")

    @property
    def context_window(self) -> int | None:
        """Tokens the loaded model attends to (prompt and reply together), where known."""
        return None

    def special_tokens(self) -> list[str]:
        """Control strings of the model's tokenizer that text must not smuggle in."""
        return []

    def close(self) -> None:  # noqa: B027 - backends with nothing to free keep the default
        """Free the model's memory and whatever process serves it."""


class Engine(dg.ConfigurableResource, ABC):
    """How a model runs. The YAML's ``engine:`` (and ``judge.engine:``) resolves into one
    subclass, picked by ``backend``; its fields are its settings, declared here only."""

    # A misspelt setting fails when the declaration loads, naming it.
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="after")
    def _within_bounds(self) -> Engine:
        check_bounds(self)
        return self

    @abstractmethod
    def _open(self, model: ModelRef, fallback: FallbackFormat | None, log: Log) -> LoadedModel:
        """Load the model (the backend's heavy library is imported here, not before)."""

    @property
    def gpus(self) -> int:
        """GPUs one loaded model takes: the GPU request of a step that loads it."""
        return 0

    def describe(self) -> str:
        return type(self).__name__

    @contextlib.contextmanager
    def load(
        self,
        model: ModelRef | str,
        fallback: FallbackFormat | None = None,
        log: Log = _log.info,
    ) -> Iterator[LoadedModel]:
        """The model, loaded once for a step and released when the block ends, however it
        ends. ``fallback`` renders a message for a model without a chat template."""
        reference = model if isinstance(model, ModelRef) else ModelRef(model=model)
        loaded = self._open(reference, fallback, log)
        try:
            yield loaded
        finally:
            loaded.close()
