"""Pairwise annotators: how a judge is asked which of two answers is better, and how its
verdict is read.

``weighted_alpaca_eval_gpt4_turbo`` (AlpacaEval 2) and ``alpaca_eval_gpt4`` (AlpacaEval 1)
are AlpacaEval's own: their ``configs.yaml`` and prompt templates are read from the installed
``alpaca-eval`` package's data files, filled as AlpacaEval fills them (each ``{key}`` replaced
once), split into ChatML messages, and their verdicts read as their configs declare (the
log-probabilities of the two model identifiers for the weighted annotator; the ranking for
AlpacaEval 1). ``bft`` is this project's one-token prompt for small local judges.

bft reads the package's files rather than importing it: ``alpaca_eval.utils`` imports
``pkg_resources``, which setuptools 81+ no longer ships, and importing ``alpaca_eval`` loads a
``.env`` file from the working directory into the environment.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from bft_assets.prompts import JUDGE
from bft_resources.engine import Chat

BFT = "bft"
ALPACA_EVAL_2 = "weighted_alpaca_eval_gpt4_turbo"
ALPACA_EVAL_1 = "alpaca_eval_gpt4"
ANNOTATORS = (BFT, ALPACA_EVAL_2, ALPACA_EVAL_1)
_FIRST_DIGIT = re.compile(r"[12]")
_CHATML = re.compile(r"<\|im_start\|>(?P<role>[^\n]*)\n(?P<content>.*?)<\|im_end\|>", re.S)


@dataclass(frozen=True)
class Annotator:
    """One way of judging a pair: the chat for (instruction, first answer, second answer),
    the two tokens whose log-probabilities give P(first is better), and the reading of a
    written verdict."""

    name: str
    version: str  # changes with the template and the reading: part of every judgement's key
    chat: Callable[[str, str, str], Chat]  # (instruction, first answer, second answer)
    read_text: Callable[[str], float | None]  # P(first better) from the reply, None if unreadable
    options: tuple[str, str] | None  # (first better, second better); None: text only
    max_tokens: int  # of a written verdict
    source: str  # where the template came from

    def from_logprobs(self, logprobs: dict[str, float]) -> float | None:
        """P(first better) = p(first token) / (p(first) + p(second)), as AlpacaEval's
        logprob_parser computes it (with ``is_binarize: false``)."""
        first, second = (math.exp(logprobs[o]) for o in self.options)
        return first / (first + second) if first + second > 0 else None


def alpaca_eval_root() -> Path:
    """The installed alpaca_eval package's folder, found without importing it."""
    spec = importlib.util.find_spec("alpaca_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "alpaca-eval is not installed: pip install alpaca-eval (its annotator configs and templates)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def chatml_messages(prompt: str) -> list[dict[str, str]]:
    """A ChatML prompt as messages, as AlpacaEval's ``prompt_to_chatml`` splits it."""
    return [
        {"role": m["role"].strip(), "content": m["content"].strip()}
        for m in _CHATML.finditer(prompt.strip())
    ]


def fill(template: str, values: dict[str, str]) -> str:
    """AlpacaEval's ``make_prompts`` for one example: each ``{key}`` replaced once (its
    templates hold literal braces, so not ``str.format``)."""
    for key, value in values.items():
        template = template.replace("{" + key + "}", value, 1)
    return template


def _as_chat(prompt: str) -> Chat:
    messages = chatml_messages(prompt)
    roles = [m["role"] for m in messages]
    if roles not in (["system", "user"], ["user"]):
        raise ValueError(
            f"annotator template with roles {roles}: expected a system and a user message"
        )
    system = messages[0]["content"] if roles[0] == "system" else ""
    return Chat(messages[-1]["content"], system=system)


def ranking_verdict(reply: str, first_name: str = "model_1") -> float | None:
    """AlpacaEval 1's ranking: 1.0 when the first model has rank 1, 0.0 with rank 2."""
    match = re.search(r"\[.*\]", reply, re.S)
    try:
        ranking = ast.literal_eval(match.group(0)) if match else None
        rank = next(r["rank"] for r in ranking if r["model"] == first_name)
    except (ValueError, SyntaxError, TypeError, KeyError, StopIteration):
        return None
    return {1: 1.0, 2: 0.0}.get(rank)


def first_digit_verdict(reply: str) -> float | None:
    """bft's prompt: the first 1 or 2 in the reply."""
    found = _FIRST_DIGIT.search(reply)
    return None if found is None else (1.0 if found.group(0) == "1" else 0.0)


def identifier_verdict(first: str, second: str) -> Callable[[str], float | None]:
    def read(reply: str) -> float | None:
        token = reply.strip()[:1]
        return 1.0 if token == first else 0.0 if token == second else None

    return read


# The reference sets of AlpacaEval's two leaderboards, by the `generator` their outputs carry,
# and the annotator each leaderboard judges with.
REFERENCE_ANNOTATORS = {"text_davinci_003": ALPACA_EVAL_1, "gpt4_1106_preview": ALPACA_EVAL_2,
                        "gpt4_turbo": ALPACA_EVAL_2}  # fmt: skip


def choose_annotator(declared: str | None, reference: str, generators: list[str | None]) -> str:
    """The declared annotator; else AlpacaEval's own for the reference set's generator, and
    bft's prompt for base-model references or a set AlpacaEval does not know."""
    if declared is not None:
        return declared
    if reference != "dataset":
        return BFT
    named = {REFERENCE_ANNOTATORS.get(g or "") for g in generators}
    return named.pop() if len(named) == 1 and None not in named else BFT


@cache
def annotator(name: str) -> Annotator:
    if name == BFT:
        return Annotator(
            BFT, JUDGE.version,
            lambda i, a, b: Chat(JUDGE.render(instruction=i, first_answer=a, second_answer=b)),
            first_digit_verdict, ("1", "2"), 4, "bft_assets/prompts.py",
        )  # fmt: skip
    if name not in ANNOTATORS:
        raise ValueError(f"annotator {name!r}: one of {', '.join(ANNOTATORS)}")
    import yaml

    root = alpaca_eval_root() / "evaluators_configs"
    config = yaml.safe_load((root / name / "configs.yaml").read_text())[name]
    template_path = root / config["prompt_template"]
    template = template_path.read_text()
    parser = config["fn_completion_parser"]
    kwargs = config.get("completion_parser_kwargs", {})
    max_tokens = int(config.get("completions_kwargs", {}).get("max_tokens", 100))
    version = hashlib.sha256((template + repr(config)).encode()).hexdigest()[:12]

    def render(instruction: str, first: str, second: str) -> Chat:
        return _as_chat(
            fill(template, {"instruction": instruction, "output_1": first, "output_2": second})
        )

    if parser == "logprob_parser":
        first_token = kwargs["numerator_token"]
        (second_token,) = [t for t in kwargs["denominator_tokens"] if t != first_token]
        return Annotator(name, version, render, identifier_verdict(first_token, second_token),
                         (first_token, second_token), max_tokens, str(template_path))  # fmt: skip
    if parser == "ranking_parser":
        first_name = kwargs.get("model_1_name", "model_1")
        return Annotator(name, version, render, lambda reply: ranking_verdict(reply, first_name), None,
                         max_tokens, str(template_path))  # fmt: skip
    raise ValueError(f"{name}: its completion parser {parser!r} is not one bft reads")
