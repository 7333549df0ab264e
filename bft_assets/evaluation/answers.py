"""The answers an evaluation compares: the fine-tuned model's to every instruction with each
suffix, and the references (the eval set's own outputs, or the untuned base model's, made
once per instance)."""

import hashlib
from dataclasses import replace
from pathlib import Path

import polars as pl

from bft_assets.checkpoint_index import verified_checkpoints
from bft_assets.instance import FINETUNED_CHECKPOINT
from bft_assets.prompts import EVAL_TAGS
from bft_assets.recipes import tag
from bft_assets.specs import DEMO_DATA, EvalSpec
from bft_assets.stage import ROW_ID, Pass, StageRun
from bft_resources.engine import Chat, LoadedModel, Sampling
from bft_resources.eval_source import EvalSetSource
from bft_resources.models import ModelRef


def eval_set(spec: EvalSpec) -> tuple[pl.DataFrame, int]:
    """The evaluation instructions (keyed by their index) and how many repeats were dropped."""
    from bft_assets.demo import demo_eval_path

    uri = str(demo_eval_path()) if spec.uri == DEMO_DATA else spec.uri
    loaded = EvalSetSource(uri=uri, limit=spec.limit).load()
    return loaded.rows.with_columns(
        pl.col("index").cast(pl.String).alias(ROW_ID)
    ), loaded.duplicates_dropped


def capped(model: LoadedModel, chats: list[Chat], sampling: Sampling) -> Sampling | list[Sampling]:
    """``sampling`` with each answer's cap cut to what its prompt leaves of the model's
    context (vLLM refuses a longer request; a transformers model would run past its window)."""
    window = model.context_window
    if window is None:
        return sampling
    return [
        replace(sampling, max_tokens=max(1, min(sampling.max_tokens, window - n)))
        for n in model.prompt_tokens(chats)
    ]


def answer_pass(sampling: Sampling, batch_rows: int, asked: str = "") -> Pass:
    """Answers to evaluation instructions, each with its row's suffix (``variant``), so that
    every suffix shares one batch: on a small model decoding costs about the same for 16 rows
    as for 8 (``asked``: a digest of the instructions, so resumed answers answer these)."""

    def answer(model: LoadedModel, rows: pl.DataFrame) -> pl.DataFrame:
        chats = [
            Chat(tag(i, EVAL_TAGS[v])) for i, v in rows.select("instruction", "variant").iter_rows()
        ]
        replies = model.generate(chats, capped(model, chats, sampling))
        tokens = pl.Series([r.completion_tokens for r in replies], dtype=pl.Int64)
        return pl.DataFrame({ROW_ID: rows[ROW_ID], "answer": [r.text.strip() for r in replies], "answer_tokens": tokens,
                             "prompt_tokens": pl.Series([r.prompt_tokens for r in replies], dtype=pl.Int64),
                             "completion_tokens": tokens})  # fmt: skip

    return Pass("answer", answer, batch_rows, f"{sampling};{asked}", "answers", versioned=False)


def with_suffixes(rows: pl.DataFrame, suffixes: list[str]) -> pl.DataFrame:
    """Each row once per suffix, its id made unique by the suffix (``question`` keeps it)."""
    return pl.concat([rows.with_columns(variant=pl.lit(s)) for s in suffixes]).with_columns(
        pl.col(ROW_ID).alias("question"), pl.concat_str(ROW_ID, "variant", separator=":").alias(ROW_ID))  # fmt: skip


def references(
    run: StageRun, spec: EvalSpec, rows: pl.DataFrame, sampling: Sampling
) -> pl.DataFrame:
    """Reference answers: the eval set's own, or the untuned base model's, made once per
    instance (every recipe compares against the same ones) and kept."""
    if spec.reference == "dataset":
        if missing := rows.filter(pl.col("reference").is_null()).height:
            raise ValueError(
                f"{missing} evaluation rows have no reference output; set reference: base_model"
            )
        return rows.select(ROW_ID, "reference")
    base = run.inst.model("base")
    key = hashlib.sha256(
        f"{base.reference};{sampling};{rows['instruction'].to_list()}".encode()
    ).hexdigest()[:12]
    if run.storage.exists(run.table, "_references", key):
        return run.storage.read(run.table, "_references", key)
    with run.load(run.inst.engine(), base) as model:
        asked = with_suffixes(rows, ["assistant"])
        answers = run.run_pass(
            model, answer_pass(sampling, spec.batch_rows), asked, base.reference, "reference"
        )
    made = asked.join(answers, on=ROW_ID).select(
        pl.col("question").alias(ROW_ID), pl.col("answer").alias("reference")
    )
    run.storage.write(run.table, made, partition="_references", suffix=key)
    return made


def answer_all(
    run: StageRun, rows: pl.DataFrame, spec: EvalSpec, sampling: Sampling
) -> tuple[pl.DataFrame, dict[int, Path]]:
    """Every declared step's answers to every instruction with each suffix, and each
    step's checkpoint folder (verified against the hash its training run recorded)."""
    checkpoints = verified_checkpoints(
        run.storage, run.inst.table(FINETUNED_CHECKPOINT), run.partition
    )
    # Resumed answers must come from this very checkpoint (its hash) and eval set.
    asked = hashlib.sha256("\x00".join(rows["instruction"]).encode()).hexdigest()[:12]
    every_suffix = with_suffixes(rows, spec.tags)
    answered = []
    for step, (folder, sha) in checkpoints.items():
        with run.load(run.inst.engine(), ModelRef(model=str(folder))) as model:
            answers = run.run_pass(model, answer_pass(sampling, spec.batch_rows * len(spec.tags), asked),
                                   every_suffix, sha, f"step{step}")  # fmt: skip
        answered.append(every_suffix.join(answers.select(ROW_ID, "answer", "answer_tokens"), on=ROW_ID)
                        .with_columns(pl.col("question").alias(ROW_ID), step=pl.lit(step, dtype=pl.Int64),
                                      checkpoint_sha256=pl.lit(sha)).drop("question"))  # fmt: skip
    return pl.concat(answered), {step: folder for step, (folder, _) in checkpoints.items()}
