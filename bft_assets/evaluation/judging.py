"""Pairwise judging: each answer against its reference, in both orders, through a declared
annotator (AlpacaEval's own, or bft's prompt), verdicts read from log-probabilities where the
judge returns them and from the written verdict otherwise. Judgements are cached by content
(instruction, both answers, judge, annotator version), saved after every batch."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import polars as pl

from bft_assets.evaluation.annotators import BFT, Annotator, annotator
from bft_assets.stage import StageRun, safe
from bft_resources.engine import Chat, Engine, LoadedModel, LogprobsUnavailable, Sampling
from bft_resources.models import ModelRef

LOGPROBS, TEXT, UNREAD = "logprobs", "text", "unread"
JUDGEMENTS = "judgements"
CACHE_SCHEMA = {"judgement_key": pl.String, "model_first": pl.Float64, "model_second": pl.Float64,
                "read_by": pl.String}  # fmt: skip


def judge_chats(
    instruction: str, first: str, second: str, clean: Callable[[str], str], reader: Annotator | None = None
) -> Chat:  # fmt: skip
    """The annotator's chat for a pair (bft's own prompt unless another is given)."""
    return (reader or annotator(BFT)).chat(clean(instruction), clean(first), clean(second))


def verdict_reading(judge: LoadedModel, probe: Chat, reader: Annotator | None = None) -> str:
    """How this judge's verdicts can be read: LOGPROBS where the annotator reads two tokens'
    log-probabilities and the judge returns them (a local model, vLLM's server, OpenAI), else
    TEXT (e.g. `transformers serve`, or AlpacaEval 1's ranking). One request finds out, so a
    judge without logprobs is not asked for them on every pair."""
    options = (reader or annotator(BFT)).options
    if options is None:
        return TEXT
    try:
        judge.option_logprobs([probe], options)
    except LogprobsUnavailable:
        return TEXT
    return LOGPROBS


def read_verdicts(
    judge: LoadedModel, chats: list[Chat], how: str = LOGPROBS, reader: Annotator | None = None
) -> list[float | None]:  # fmt: skip
    """P(answer 1 is better) per chat: from the log-probabilities of the annotator's two
    tokens (``how=LOGPROBS``), or from the written verdict (``TEXT``)."""
    reader = reader or annotator(BFT)
    if how == TEXT:
        replies = judge.generate(
            chats, Sampling(temperature=0.0, top_p=1.0, max_tokens=reader.max_tokens)
        )
        return [reader.read_text(r.text) for r in replies]
    return [reader.from_logprobs(lp) for lp in judge.option_logprobs(chats, reader.options)]


def combine_orders(
    model_first: float | None, model_second: float | None
) -> tuple[float | None, bool | None]:
    """(preference for the model, whether both orders agree). ``model_first`` is P(answer 1)
    with the model's answer first; ``model_second`` is P(answer 1) with the reference first."""
    views = [
        p
        for p in (model_first, None if model_second is None else 1 - model_second)
        if p is not None
    ]
    if not views:
        return None, None
    agree = None if len(views) < 2 else (views[0] > 0.5) == (views[1] > 0.5) or views[0] == views[1]
    return sum(views) / len(views), agree


def judgement_key(instruction: str, answer: str, reference: str, judge: str, version: str) -> str:
    text = "\x00".join((instruction, answer, reference, judge, version))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def judge_all(
    model: LoadedModel, todo: pl.DataFrame, cache: dict[str, tuple], save: Callable[[], None], batch: int,
    reader: Annotator, log: Callable[[str], None],
) -> None:  # fmt: skip
    """Judge every (instruction, answer, reference) of ``todo`` in both orders into
    ``cache`` (judgement_key -> (model first, model second, read by)), calling ``save``
    after each batch so what was judged survives a failure."""
    if todo.height == 0:
        return
    clean = safe(model)
    first = todo.row(0, named=True)
    how = verdict_reading(model, judge_chats(first["instruction"], first["answer"], first["reference"], clean, reader), reader)  # fmt: skip
    log(f"annotator {reader.name}: verdicts read from {how}")
    for start in range(0, todo.height, batch):
        part = todo.slice(start, batch)
        rows = list(part.select("instruction", "answer", "reference").iter_rows())
        model_first = read_verdicts(
            model, [judge_chats(i, a, r, clean, reader) for i, a, r in rows], how, reader
        )
        model_second = read_verdicts(
            model, [judge_chats(i, r, a, clean, reader) for i, a, r in rows], how, reader
        )
        for key, p1, p2 in zip(part["judgement_key"], model_first, model_second, strict=True):
            cache[key] = (p1, p2, how if p1 is not None and p2 is not None else UNREAD)
        save()
        log(f"judged {min(start + batch, todo.height)} of {todo.height} new pairs")


def judge_pairs(
    run: StageRun, pairs: pl.DataFrame, reader: Annotator, batch: int, engine: Engine, model: ModelRef,
    name: str = "",
) -> tuple[pl.DataFrame, int]:  # fmt: skip
    """``pairs`` (instruction, answer, reference) with both orders' verdicts, the combined
    preference and whether the orders agree; and how many judgements came from the cache
    (the recipe's judgements table, one per judge ``name``, written after every batch: a
    re-run re-judges nothing that did not change, and a judge that fails mid-run loses
    nothing already judged)."""
    judge = f"{engine.backend}:{model.reference}"
    table = f"{JUDGEMENTS}_{name}" if name else JUDGEMENTS
    keyed = pairs.with_columns(judgement_key=pl.struct("instruction", "answer", "reference").map_elements(
        lambda r: judgement_key(r["instruction"], r["answer"], r["reference"], judge, reader.version),
        return_dtype=pl.String))  # fmt: skip
    stored = run.storage.exists(run.table, run.partition, table)
    cached = (
        run.storage.read(run.table, run.partition, table)
        if stored
        else pl.DataFrame(schema=CACHE_SCHEMA)
    )
    cache = {k: (a, b, c) for k, a, b, c in cached.iter_rows()}
    reused = len(set(keyed["judgement_key"]) & set(cache))
    todo = keyed.filter(~pl.col("judgement_key").is_in(list(cache))).unique(
        "judgement_key", keep="first"
    )

    def save() -> None:
        verdicts = pl.DataFrame(
            [(k, *v) for k, v in cache.items()], schema=CACHE_SCHEMA, orient="row"
        )
        run.storage.write(run.table, verdicts, partition=run.partition, suffix=table)

    if todo.height:
        with run.load(engine, model) as loaded:
            judge_all(loaded, todo, cache, save, batch, reader, run.log)
    verdicts = [cache[k] for k in keyed["judgement_key"]]
    combined = [combine_orders(a, b) for a, b, _ in verdicts]
    return keyed.with_columns(
        model_first=pl.Series([v[0] for v in verdicts], dtype=pl.Float64),
        model_second=pl.Series([v[1] for v in verdicts], dtype=pl.Float64),
        read_by=pl.Series([v[2] for v in verdicts], dtype=pl.String),
        preference=pl.Series([c[0] for c in combined], dtype=pl.Float64),
        agree=pl.Series([c[1] for c in combined], dtype=pl.Boolean),
        judge=pl.lit(judge),
    ), reused  # fmt: skip
