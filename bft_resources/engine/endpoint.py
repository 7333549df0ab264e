"""The endpoint backend: a model served elsewhere behind an OpenAI-compatible API (a vLLM
server, a hosted API, ``transformers serve``).

Requests go out concurrently (bounded), and a 429, a 5xx, a timeout or a dropped
connection is retried with exponential backoff and jitter; when the server stays down the
call fails with a clear error. The key comes from configuration (an ``EnvVar``) and is
never logged.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import dagster as dg
import requests
from pydantic import Field

from bft_resources.bounds import bounded
from bft_resources.engine.base import (
    Chat,
    Engine,
    FallbackFormat,
    Generation,
    LoadedModel,
    Log,
    LogprobsUnavailable,
    Sampling,
    per_chat,
)
from bft_resources.models import ModelRef

RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER_S = 60.0  # a server asking for more is waited on this long, then tried again
_BODY_EXCERPT = 200
_SECRET_LIKE = re.compile(r"(?i)(bearer\s+|api[_-]?key\W{1,3}|sk-)[\w.\-]{6,}")
# A piece of the configured key this long or longer is redacted wherever it appears (a server
# may echo a key cut short); shorter runs are too common to tell from ordinary text.
MIN_KEY_PIECE = 8
REDACTED = "[redacted]"


def without_key(text: str, key: str, piece: int = MIN_KEY_PIECE) -> str:
    """``text`` with every run of ``piece`` or more characters that occurs in ``key``
    replaced, the whole key included."""
    if len(key) < piece:
        return text.replace(key, REDACTED) if key else text
    windows = sorted({key[i : i + piece] for i in range(len(key) - piece + 1)})
    spans: list[list[int]] = []
    for found in re.finditer("|".join(map(re.escape, windows)), text):
        start, end = found.start(), found.end()
        while end < len(text) and text[start : end + 1] in key:
            end += 1
        if spans and start <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], end)
        else:
            spans.append([start, end])
    for start, end in reversed(spans):
        text = text[:start] + REDACTED + text[end:]
    return text


class EndpointError(RuntimeError):
    """The endpoint did not answer usefully after every retry."""


class EndpointEngine(Engine):
    """A model served elsewhere behind an OpenAI-compatible API (vLLM's server, a hosted
    API, ``transformers serve``): bounded concurrency, retries with backoff."""

    backend: Literal["endpoint"] = "endpoint"
    base_url: str = Field(
        description="e.g. http://127.0.0.1:8000/v1", examples=["https://api.openai.com/v1"]
    )
    api_key_env: str | None = Field(
        default=None,
        description="NAME of the environment variable holding the key (read as a dagster EnvVar when a step "
        "loads the model; never logged).",
        examples=["OPENAI_API_KEY"],
    )
    served_model: str | None = Field(
        default=None, description="The model's name on the server (default: the model reference)."
    )
    max_concurrency: int = bounded(8, ge=1, description="Requests in flight at once.")
    max_retries: int = bounded(5, ge=0, description="Retries on 429/5xx/timeouts.")
    timeout_s: float = bounded(120.0, gt=0, description="Seconds per request.")
    retry_backoff_s: float = bounded(
        0.5, ge=0, description="First retry delay, doubled each retry, jittered."
    )

    def describe(self) -> str:
        return f"endpoint ({self.base_url})"

    def _open(self, model: ModelRef, fallback: FallbackFormat | None, log: Log) -> LoadedModel:
        key = dg.EnvVar(self.api_key_env).get_value() if self.api_key_env else None
        if self.api_key_env and not key:
            raise ValueError(f"the endpoint's key variable {self.api_key_env} is not set")
        client = EndpointClient(
            self.base_url, key, self.max_concurrency, self.max_retries, self.timeout_s,
            backoff_s=self.retry_backoff_s,
        )  # fmt: skip
        return EndpointModel(client, self.served_model or model.model)


class EndpointClient:
    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        max_concurrency: int,
        max_retries: int,
        timeout_s: float,
        backoff_s: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.base_url = base_url.rstrip("/")
        self._secret = api_key or None
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self._sleep = sleep
        self._session = requests.Session()
        if api_key:
            self._session.headers["Authorization"] = f"Bearer {api_key}"
        self.retries = 0  # how many retries this client made, for metadata
        self.served_models: set[str] = set()  # what the server says answered

    def redact(self, text: str) -> str:
        """Text from a server made safe for an error message and a log: the configured key
        (or any piece of it of MIN_KEY_PIECE characters or more), and anything shaped like a
        key or a bearer token, removed. Redact first, cut after: a cut can split a key."""
        if self._secret:
            text = without_key(text, self._secret)
        return _SECRET_LIKE.sub(r"\1" + REDACTED, text)

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        url = f"{self.base_url}{path}"
        last, retry_after = "no attempt", None
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.retries += 1
                self._sleep(self._delay(attempt, retry_after))
                retry_after = None
            try:
                response = self._session.post(url, json=body, timeout=self.timeout_s)
            except (requests.ConnectionError, requests.Timeout) as exc:
                last = f"{type(exc).__name__}"
                continue
            if response.status_code in RETRY_STATUS:
                last = f"HTTP {response.status_code}"
                retry_after = response.headers.get("Retry-After")
                continue
            if response.status_code >= 400:
                excerpt = self.redact(response.text)[:_BODY_EXCERPT]
                raise EndpointError(f"{url} answered HTTP {response.status_code}: {excerpt}")
            try:
                reply = response.json()
            except ValueError:  # a proxy's HTML error page under a 200: retried like a 5xx
                last = f"HTTP {response.status_code} with a body that is not JSON"
                continue
            if isinstance(reply, dict) and isinstance(reply.get("model"), str):
                self.served_models.add(reply["model"])
            return reply
        raise EndpointError(
            f"{url} failed after {self.max_retries + 1} attempts; last error: {last}"
        )

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        """Exponential backoff with jitter, unless the server said how long to wait (capped:
        a Retry-After of a day would hold the GPU slot for a day)."""
        if retry_after and retry_after.replace(".", "", 1).isdigit():
            return min(float(retry_after), MAX_RETRY_AFTER_S)
        return self.backoff_s * 2 ** (attempt - 1) * (0.5 + random.random())

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            return list(pool.map(fn, items))


class EndpointModel(LoadedModel):
    def __init__(self, client: EndpointClient, model: str):
        self.client = client
        self.model = model

    @property
    def reference(self) -> str:  # type: ignore[override]
        """The model the server says answered (it may differ from the name asked for)."""
        served = sorted(self.client.served_models)
        return ",".join(served) if served else self.model

    def _messages(self, chat: Chat) -> list[dict[str, str]]:
        messages = chat.messages()
        if chat.assistant_prefix:
            messages.append({"role": "assistant", "content": chat.assistant_prefix})
        return messages

    def _body(self, chat: Chat, sampling: Sampling, **extra: Any) -> dict[str, Any]:
        body = {
            "model": self.model,
            "messages": self._messages(chat),
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_tokens,
            "n": sampling.n,
            **extra,
        }
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        if chat.assistant_prefix:  # vLLM's server: continue the given assistant message
            body.update(continue_final_message=True, add_generation_prompt=False)
        return body

    def generate(
        self, chats: Sequence[Chat], sampling: Sampling | Sequence[Sampling]
    ) -> list[Generation]:
        def one(request: tuple[Chat, Sampling]) -> Generation:
            chat, params = request
            reply = self.client.post("/chat/completions", self._body(chat, params))
            usage = reply.get("usage") or {}
            choices = reply.get("choices") or []
            if not choices:
                raise EndpointError(f"{self.client.base_url}: a reply with no choices")
            return Generation(
                texts=tuple((c.get("message") or {}).get("content") or "" for c in choices),
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                completion_tokens=int(usage.get("completion_tokens") or 0),
                finish_reasons=tuple(c.get("finish_reason") or "stop" for c in choices),
            )

        return self.client.map(one, list(zip(chats, per_chat(sampling, len(chats)), strict=True)))

    def option_logprobs(
        self, chats: Sequence[Chat], options: Sequence[str]
    ) -> list[dict[str, float]]:
        greedy = Sampling(temperature=0.0, top_p=1.0, max_tokens=1, n=1)

        def one(chat: Chat) -> dict[str, float]:
            reply = self.client.post(
                "/chat/completions", self._body(chat, greedy, logprobs=True, top_logprobs=20)
            )
            content = ((reply.get("choices") or [{}])[0].get("logprobs") or {}).get("content")
            if not content:
                raise LogprobsUnavailable(
                    f"{self.client.base_url} returned no logprobs for model {self.model!r} "
                    "(transformers serve ignores them; vLLM's server and OpenAI return them): "
                    "use scoring mode 'generate' with this endpoint"
                )
            top = {t["token"]: t["logprob"] for t in content[0].get("top_logprobs", [])}
            return {
                option: math.log(sum(math.exp(lp) for tok, lp in top.items() if tok.strip() == option) or 0.0)
                if any(tok.strip() == option for tok in top) else -math.inf
                for option in options
            }  # fmt: skip

        return self.client.map(one, chats)
