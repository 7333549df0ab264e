"""eval_scores[recipe]: how good is the model a recipe trained, and what did its data look like
(METHOD.md step 5).

The fine-tuned checkpoint answers every evaluation instruction with each evaluation suffix
(T=0.7, top_p=0.9); a judge compares each answer with the reference answer in both orders;
the scores are AlpacaEval-style win rates (raw, with standard error, and length-controlled),
answer lengths, and the training set's diversity (unique trigrams at equal sample size) and
MAUVE against the distilled and web answers to the same instructions, beside a
distilled-vs-distilled control. The judge is asked through a declared annotator (AlpacaEval's
own, or bft's prompt: ``bft_assets/annotators.py``); every declared training step's
checkpoint is evaluated and the best reported, as the paper does.
"""

import hashlib
import json
import math
from collections.abc import Callable

import dagster as dg
import polars as pl

from bft_assets.annotators import BFT, Annotator, annotator
from bft_assets.checks import rate_floor_check
from bft_assets.generation import safe
from bft_assets.instance import (
    EVAL_SCORES,
    FINETUNED_CHECKPOINT,
    REWRITTEN_DATASET,
    BftInstance,
    digest,
)
from bft_assets.lc import lc_scores
from bft_assets.metrics import unique_trigrams, win_rate
from bft_assets.prompts import EVAL_TAGS, JUDGE, llama2_inst
from bft_assets.reporting import markdown_table, table_metadata
from bft_assets.specs import EvalSpec
from bft_assets.training import (
    has_text,
    manifest_sha256,
    read_checkpoint_index,
    read_rewritten,
    stable_order,
    tag,
)
from bft_resources.embeddings import Embedder
from bft_resources.engine import Chat, InferenceEngine, LoadedModel, LogprobsUnavailable, Sampling
from bft_resources.judge import Judge
from bft_resources.models import ModelResource
from bft_resources.quality import Rule, run_rules
from bft_resources.storage import Storage
from bft_resources.work import ResumableWork

LOGPROBS, TEXT, UNREAD = "logprobs", "text", "unread"

CHECK_ALL_JUDGED = "eval_scores_all_judged"
CHECK_PREFERENCE_RANGE = "eval_scores_preferences_in_range"
CHECK_AGREEMENT = "eval_scores_order_agreement"
CHECK_WIN_RATES = "eval_scores_win_rates_valid"
EVAL_RULES = (
    Rule(CHECK_PREFERENCE_RANGE, "ExpectColumnValuesToBeBetween",
         {"column": "preference", "min_value": 0.0, "max_value": 1.0}, blocking=True,
         description="Every preference is a probability in [0, 1]."),
)  # fmt: skip


# ---- the method: judging ------------------------------------------------------------------


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


def judgement_key(
    instruction: str, answer: str, reference: str, judge: str, annotator_version: str = JUDGE.version
) -> str:  # fmt: skip
    text = "\x00".join((instruction, answer, reference, judge, annotator_version))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


# ---- the method: data analyses ------------------------------------------------------------


def diversity(training_set: pl.DataFrame, sample: int, seed: int = 0) -> dict[str, float]:
    """Unique trigrams of generated instructions and responses at a fixed sample size."""
    generated = training_set.filter(pl.col("source") == "generated")
    n = min(sample, generated.height)
    if n == 0:
        return {"diversity_sample": 0}
    picked = generated.sample(n=n, seed=seed)
    return {
        "diversity_sample": n,
        "unique_trigrams_instructions": unique_trigrams(picked["instruction"].to_list()),
        "unique_trigrams_responses": unique_trigrams(picked["response"].to_list()),
    }


# ---- the asset ---------------------------------------------------------------------------


def _key_frame(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.with_columns(row_id=pl.col("index").cast(pl.String))


def _answer(
    model: LoadedModel, rows: pl.DataFrame, suffix: str, sampling: Sampling
) -> pl.DataFrame:
    replies = model.generate([Chat(tag(i, suffix)) for i in rows["instruction"]], sampling)
    return pl.DataFrame({
        "row_id": rows["row_id"], "answer": [r.text.strip() for r in replies],
        "answer_tokens": pl.Series([r.completion_tokens for r in replies], dtype=pl.Int64),
        "prompt_tokens": pl.Series([r.prompt_tokens for r in replies], dtype=pl.Int64),
        "completion_tokens": pl.Series([r.completion_tokens for r in replies], dtype=pl.Int64),
    })  # fmt: skip


def _generate_answers(
    model: LoadedModel, rows: pl.DataFrame, suffix: str, sampling: Sampling, work: ResumableWork,
    batch_rows: int, log: Callable[[str], None],
) -> pl.DataFrame:  # fmt: skip
    answers, _ = work.run(
        rows, lambda b: _answer(model, b, suffix, sampling), batch_rows, log, "answers"
    )
    return answers.select("row_id", "answer", "answer_tokens")


def _references(
    context: dg.AssetExecutionContext, config: EvalSpec, eval_set: pl.DataFrame, engine: InferenceEngine,
    base_model: ModelResource, storage: Storage, table: str, sampling: Sampling,
) -> pl.DataFrame:  # fmt: skip
    """Reference answers: the eval set's own, or the untuned base model's (made once, kept)."""
    rows = _key_frame(eval_set)
    if config.reference == "dataset":
        missing = rows.filter(pl.col("reference").is_null()).height
        if missing:
            raise ValueError(
                f"{missing} evaluation rows have no reference output; set reference: base_model"
            )
        return rows.select("row_id", "reference")
    key = hashlib.sha256(
        f"{base_model.reference};{sampling};{rows['instruction'].to_list()}".encode()
    ).hexdigest()[:12]
    if storage.exists(table, "_references", key):
        return storage.read(table, "_references", key)
    work = ResumableWork(
        storage.scratch_dir(table, "_references", key), "row_id", context.log.warning
    )
    with engine.load(base_model, fallback=llama2_inst) as model:
        answers = _generate_answers(
            model, rows, EVAL_TAGS["assistant"], sampling, work, config.batch_rows, context.log.info
        )
    references = answers.select("row_id", pl.col("answer").alias("reference"))
    storage.write(table, references, partition="_references", suffix=key)
    work.clear()
    return references


def _judge_all(
    judge: Judge, pairs: pl.DataFrame, cache: dict[str, tuple], save: Callable[[], None], batch: int,
    log: Callable[[str], None], reader: Annotator | None = None,
) -> None:  # fmt: skip
    """Judge every (instruction, answer, reference) not in the cache, in both orders,
    saving the cache after each batch so what was judged survives a failure."""
    todo = pairs.filter(~pl.col("judgement_key").is_in(list(cache)))
    if todo.height == 0:
        return
    reader = reader or annotator(BFT)
    with judge.load() as model:
        clean = safe(model)
        first = todo.row(0, named=True)
        how = verdict_reading(
            model,
            judge_chats(first["instruction"], first["answer"], first["reference"], clean, reader),
            reader,
        )
        log(f"judge {judge.reference}, annotator {reader.name}: verdicts read from {how}")
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


def _variant_scores(table: pl.DataFrame, variant: str) -> dict[str, float]:
    rows = table.filter(pl.col("variant") == variant)
    judged = rows.filter(pl.col("preference").is_not_null())
    wr = win_rate(judged["preference"].to_list())
    # AlpacaEval's own LC (with its instruction difficulty) where the instructions are its 805,
    # the simplified GLM elsewhere; the variant is reported beside it.
    lc = (
        lc_scores(judged["instruction"].to_list(), judged["preference"].to_list(),
                  judged["answer"].str.len_chars().to_list(), judged["reference"].str.len_chars().to_list())
        if judged.height >= 3 else None
    )  # fmt: skip
    agreement = rows["agree"].drop_nulls()
    return {
        f"{variant}_win_rate": wr.win_rate,
        f"{variant}_standard_error": wr.standard_error,
        f"{variant}_lc_win_rate": lc["length_controlled_winrate"] if lc else math.nan,
        f"{variant}_lc_variant": lc["lc_variant"] if lc else "none",
        f"{variant}_judged": wr.n,
        f"{variant}_agreement": float(agreement.mean()) if agreement.len() else math.nan,
        f"{variant}_answer_tokens": float(rows["answer_tokens"].mean() or 0.0),
    }


def alpaca_eval_outputs(results: pl.DataFrame, generator: str) -> str:
    """Answers in AlpacaEval's model_outputs format (the instruction as the eval set has it,
    without the suffix the model was asked with), for ``alpaca_eval evaluate --model_outputs``."""
    rows = [{"instruction": i, "output": o, "generator": generator, "dataset": d}
            for i, o, d in results.select("instruction", "answer", "dataset").iter_rows()]  # fmt: skip
    return json.dumps(rows, ensure_ascii=False, indent=1)


def best_steps(by_step: dict[int, dict], tags: list[str]) -> dict:
    """Each suffix's scores at its best checkpoint (the paper reports the highest win rate
    over the steps it trains for), with the best step and every step's win rate beside them."""
    out: dict = {}
    for suffix in tags:
        best = max(by_step, key=lambda step: _finite(by_step[step][f"{suffix}_win_rate"]))
        out.update({k: v for k, v in by_step[best].items() if k.startswith(f"{suffix}_")})
        out[f"{suffix}_best_step"] = best
        for step, scores in by_step.items():
            out[f"{suffix}_step{step}_win_rate"] = scores[f"{suffix}_win_rate"]
    return out


def _finite(value: float) -> float:
    return value if math.isfinite(value) else -math.inf


def _step_table(by_step: dict[int, dict], tags: list[str]) -> dg.MetadataValue:
    return markdown_table([
        {"step": step, "suffix": suffix, "win_rate": round(scores[f"{suffix}_win_rate"], 2),
         "standard_error": round(scores[f"{suffix}_standard_error"], 2),
         "lc_win_rate": round(scores[f"{suffix}_lc_win_rate"], 2)}
        for step, scores in sorted(by_step.items()) for suffix in tags
    ])  # fmt: skip


def mauve_scores(
    embedder: Embedder, pool: pl.DataFrame, generated: pl.DataFrame, limit: int, seed: int = 0
) -> dict:
    """MAUVE as the paper sets it up: the recipe's responses against the aligned model's
    distilled answers to the same instructions (and against the web responses to them), up
    to ``limit`` pairs (paper: 10K), beside a control: distilled answers to two disjoint
    halves of the instructions, i.e. what MAUVE gives two samples of one distribution."""
    if limit <= 0 or generated.height < 2 or pool.is_empty():
        return {}
    columns = [pl.col("doc_id").alias("id"), pl.col("response").alias("web")]
    distilled = "distilled" in pool.columns
    pool = pool.select(*columns, *(["distilled"] if distilled else []))
    same = generated.select("id", pl.col("response").alias("ours")).join(pool, on="id", how="inner")
    same = stable_order(same, "id", seed).head(limit)
    out: dict = {"mauve_features": embedder.mauve_features, "mauve_pairs": same.height}
    if same.height >= 2:
        out["mauve_vs_web"] = embedder.mauve(same["ours"].to_list(), same["web"].to_list(), seed)
    if distilled:
        answered = same.filter(has_text("distilled"))
        if answered.height >= 2:
            out["mauve_vs_distilled"] = embedder.mauve(
                answered["ours"].to_list(), answered["distilled"].to_list(), seed
            )
            out["mauve_pairs_distilled"] = answered.height
        control = stable_order(pool.filter(has_text("distilled")), "id", seed + 1)
        halves = control["distilled"].to_list()
        first, second = halves[0::2][:limit], halves[1::2][:limit]
        if min(len(first), len(second)) >= 2:
            out["mauve_control_distilled"] = embedder.mauve(first, second, seed)
    return out


RECIPE_TABLE_COLUMNS = (
    "recipe", "suffix", "win_rate", "standard_error", "lc_win_rate", "generated_pairs",
    "unique_trigrams_instructions", "unique_trigrams_responses", "mean_instruction_tokens",
    "mean_response_tokens", "mauve_vs_web",
)  # fmt: skip


def shared_suffix(summaries: pl.DataFrame, tags: list[str]) -> str | None:
    """The suffix with the higher win rate on average over the compared recipes: one choice
    for all of them, as the paper makes it (a choice per recipe would flatter every one)."""
    means = {
        tag: summaries[f"{tag}_win_rate"].drop_nans().mean()
        for tag in tags
        if f"{tag}_win_rate" in summaries.columns
    }
    means = {tag: m for tag, m in means.items() if m is not None}
    return max(means, key=means.__getitem__) if means else None


def recipe_summaries(inst: BftInstance, storage: Storage) -> pl.DataFrame:
    """One row per evaluated recipe of an instance, side by side, every recipe's win rate
    under the one suffix chosen across them (each suffix's scores stay in the summaries)."""
    table = inst.table(EVAL_SCORES)
    rows = [
        storage.read(table, recipe.name, "summary")
        for recipe in inst.recipes
        if storage.exists(table, recipe.name, "summary")
    ]
    if not rows:
        return pl.DataFrame()
    summaries = pl.concat(rows, how="diagonal_relaxed")
    suffix = shared_suffix(summaries, inst.eval.tags)
    if suffix is not None:
        summaries = summaries.with_columns(
            suffix=pl.lit(suffix),
            win_rate=pl.col(f"{suffix}_win_rate"),
            standard_error=pl.col(f"{suffix}_standard_error"),
            lc_win_rate=pl.col(f"{suffix}_lc_win_rate"),
        )
    return summaries.select([c for c in RECIPE_TABLE_COLUMNS if c in summaries.columns])


def _recipe_table(summaries: pl.DataFrame) -> dg.MetadataValue:
    return markdown_table(
        [
            {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()}
            for r in summaries.to_dicts()
        ]
    )


def mean_tokens(model: ModelResource, texts: list[str]) -> float:
    """Mean length in tokens of the model's tokenizer (0 for no texts)."""
    if not texts:
        return 0.0
    encoded = model.tokenizer()(texts, add_special_tokens=False)["input_ids"]
    return float(sum(len(ids) for ids in encoded) / len(texts))


def build_eval_scores(inst: BftInstance) -> dg.AssetsDefinition:
    key = inst.key(EVAL_SCORES)
    table = inst.table(EVAL_SCORES)
    config = inst.eval
    reader = annotator(inst.judge.annotator)
    unknown = sorted(set(config.tags) - set(EVAL_TAGS))
    if unknown:
        raise ValueError(f"eval.tags: unknown {unknown}; known: {sorted(EVAL_TAGS)}")

    @dg.asset(
        **inst.asset_args(EVAL_SCORES, {"huggingface", "polars"},
                          {"engine", "judge", "eval_set", "base_model", "embedder", "storage"}),
        partitions_def=inst.recipe_partitions,
        deps=[inst.key(FINETUNED_CHECKPOINT),
              dg.AssetDep(inst.key(REWRITTEN_DATASET), partition_mapping=dg.AllPartitionMapping())],
        group_name="evaluation",
        **inst.gpu_args(inst.engine.tensor_parallel_size),
        code_version=f"judge={reader.version};eval-v1;{digest(config, inst.judge, inst.judge_model)}",
        check_specs=[rule.spec(key) for rule in EVAL_RULES]
        + [
            dg.AssetCheckSpec(CHECK_ALL_JUDGED, asset=key, blocking=True,
                              description="Every instruction was judged in both orders; the shortfall is an ERROR."),
            dg.AssetCheckSpec(CHECK_AGREEMENT, asset=key,
                              description="The judge agrees with itself across the two orders often enough (WARN)."),
            dg.AssetCheckSpec(CHECK_WIN_RATES, asset=key,
                              description="Win rates lie in [0, 100] and carry a finite standard error."),
        ],
    )  # fmt: skip
    def eval_scores(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        """Win rate (with standard error), length-controlled win rate and answer lengths of
        the recipe's fine-tuned model against reference answers, judged pairwise in both
        orders, for each evaluation suffix; and the recipe's data: trigram diversity and
        MAUVE."""
        r = inst.bound(context)
        engine, judge, base_model, embedder, storage = (
            r.engine,
            r.judge,
            r.base_model,
            r.embedder,
            r.storage,
        )
        sampling = Sampling(temperature=config.temperature, top_p=config.top_p,
                            max_tokens=config.max_new_tokens, seed=config.seed)  # fmt: skip
        questions = r.eval_set.read()
        recipe = context.partition_key
        references = _references(
            context, config, questions, engine, base_model, storage, table, sampling
        )
        rows = _key_frame(questions).drop("reference").join(references, on="row_id")
        checkpoints = read_checkpoint_index(storage, inst.table(FINETUNED_CHECKPOINT), recipe)
        instructions = "\x00".join(rows["instruction"].to_list())
        answered, works, folders = [], [], {}
        for step, part, sha in checkpoints.select(
            "step", "partition", "manifest_sha256"
        ).iter_rows():
            checkpoint = storage.fetch_checkpoint(inst.table(FINETUNED_CHECKPOINT), part)
            if manifest_sha256(checkpoint) != sha:
                raise RuntimeError(
                    f"{checkpoint}: its manifest is not the one its training run recorded"
                )
            folders[step] = str(checkpoint)
            with engine.load(ModelResource(model=str(checkpoint)), fallback=llama2_inst) as model:
                for variant in config.tags:
                    # Resumed answers must come from this very checkpoint and eval set: both are in the key.
                    key = hashlib.sha256(
                        f"{variant};{sampling};{instructions};{sha}".encode()
                    ).hexdigest()[:16]
                    # Kept until the judging is done: a judge that fails mid-run costs no answer.
                    work = ResumableWork(
                        storage.scratch_dir(table, recipe, key), "row_id", context.log.warning
                    )
                    works.append(work)
                    answers = _generate_answers(
                        model,
                        rows,
                        EVAL_TAGS[variant],
                        sampling,
                        work,
                        config.batch_rows,
                        context.log.info,
                    )
                    answered.append(
                        rows.join(answers, on="row_id").with_columns(
                            variant=pl.lit(variant),
                            step=pl.lit(step, dtype=pl.Int64),
                            checkpoint_sha256=pl.lit(sha),
                        )
                    )
        pairs = pl.concat(answered).with_columns(
            judgement_key=pl.struct("instruction", "answer", "reference").map_elements(
                lambda r: judgement_key(
                    r["instruction"], r["answer"], r["reference"], judge.reference, reader.version
                ),
                return_dtype=pl.String,
            )
        )

        cached = (
            storage.read(table, recipe, "judgements")
            if storage.exists(table, recipe, "judgements")
            else None
        )
        cache = {} if cached is None else {k: (a, b, c) for k, a, b, c in cached.iter_rows()}
        reused = len(set(pairs["judgement_key"]) & set(cache))

        def save() -> None:
            storage.write(table, pl.DataFrame(
                [(k, *v) for k, v in cache.items()],
                schema={"judgement_key": pl.String, "model_first": pl.Float64, "model_second": pl.Float64,
                        "read_by": pl.String}, orient="row",
            ), partition=recipe, suffix="judgements")  # fmt: skip

        _judge_all(judge, pairs, cache, save, config.batch_rows, context.log.info, reader)
        verdicts = [cache[k] for k in pairs["judgement_key"]]
        combined = [combine_orders(a, b) for a, b, _ in verdicts]
        results = pairs.with_columns(
            model_first=pl.Series([v[0] for v in verdicts], dtype=pl.Float64),
            model_second=pl.Series([v[1] for v in verdicts], dtype=pl.Float64),
            read_by=pl.Series([v[2] for v in verdicts], dtype=pl.String),
            preference=pl.Series([c[0] for c in combined], dtype=pl.Float64),
            agree=pl.Series([c[1] for c in combined], dtype=pl.Boolean),
            recipe=pl.lit(recipe),
            judge=pl.lit(judge.reference),
        )
        uri = storage.write(table, results, partition=recipe)
        outputs = {
            (step, variant): storage.write_text(
                f"{table}/{recipe}.alpaca_eval/{variant}.step{step}.json",
                alpaca_eval_outputs(results.filter((pl.col("step") == step) & (pl.col("variant") == variant)),
                                    f"{inst.prefix}-{recipe}-step{step}"),
            )
            for step in folders for variant in config.tags
        }  # fmt: skip
        for work in works:
            work.clear()

        by_step = {
            step: {k: v for variant in config.tags for k, v in _variant_scores(results.filter(pl.col("step") == step), variant).items()}
            for step in folders
        }  # fmt: skip
        scores = best_steps(by_step, config.tags)
        training_set = storage.read(inst.table(FINETUNED_CHECKPOINT), recipe, "train")
        generated = training_set.filter(pl.col("source") == "generated")
        shards = context.instance.get_dynamic_partitions(inst.shards.name)
        data_scores = {
            **diversity(training_set, config.diversity_sample),
            "generated_pairs": generated.height,
            # BFT Table 6 counts tokens (the base model's); words stay as extra columns.
            "mean_instruction_tokens": mean_tokens(base_model, generated["instruction"].to_list()),
            "mean_response_tokens": mean_tokens(base_model, generated["response"].to_list()),
            "mean_instruction_words": float(
                generated["instruction"].str.split(" ").list.len().mean() or 0.0
            ),
            "mean_response_words": float(
                generated["response"].str.split(" ").list.len().mean() or 0.0
            ),
            **mauve_scores(
                embedder,
                read_rewritten(inst, storage, shards)[0] if config.mauve_texts else pl.DataFrame(),
                generated,
                config.mauve_texts,
                config.seed,
            ),
        }
        summary = {"recipe": recipe, **scores, **data_scores}
        storage.write(table, pl.DataFrame([summary]), partition=recipe, suffix="summary")
        compared = recipe_summaries(inst, storage)
        suffix = compared["suffix"][0] if "suffix" in compared.columns else config.tags[0]

        by_source = (
            results.filter(pl.col("variant") == suffix).group_by("dataset")
            .agg(pl.len().alias("instructions"), (pl.col("preference").mean() * 100).round(1).alias("win_rate"))
            .sort("dataset")
        )  # fmt: skip
        unjudged = results.filter(
            pl.col("preference").is_null() | (pl.col("read_by") == UNREAD)
        ).height
        agree = results["agree"].drop_nulls()
        rates_ok = all(
            0.0 <= scores[f"{v}_win_rate"] <= 100.0 and math.isfinite(scores[f"{v}_standard_error"])
            for v in config.tags
        )
        return dg.MaterializeResult(
            metadata={
                "recipe": recipe,
                **table_metadata(results, {"preference": "P(model answer better), both orders averaged",
                                         "agree": "Both orders pick the same winner", "read_by": "logprobs, text or unread"}),
                "instructions": questions.height,
                "judged_pairs": results.height - unjudged,
                "judgements_reused": reused,
                "read_by": markdown_table([{"read_by": k, "pairs": n} for k, n in results["read_by"].value_counts().rows()]),
                **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in summary.items() if k != "recipe"},
                "recipes": _recipe_table(compared),
                "suffix_chosen_across_recipes": suffix,
                "win_rate_by_source": markdown_table(by_source.to_dicts()),
                "path": dg.MetadataValue.path(uri),
                "alpaca_eval_outputs": dg.MetadataValue.path(outputs[scores[f"{suffix}_best_step"], suffix]),
                "judge": judge.reference,
                "annotator": reader.name,
                "annotator_template": dg.MetadataValue.path(reader.source),
                "checkpoint": dg.MetadataValue.path(folders[scores[f"{suffix}_best_step"]]),
                "checkpoint_steps": _step_table(by_step, config.tags),
            },
            check_results=[
                *run_rules(results, EVAL_RULES),
                dg.AssetCheckResult(check_name=CHECK_ALL_JUDGED, passed=unjudged == 0 and results.height > 0,
                                    metadata={"unjudged": unjudged, "pairs": results.height}),
                rate_floor_check(CHECK_AGREEMENT, int(agree.sum()), agree.len(), config.min_agreement),
                dg.AssetCheckResult(check_name=CHECK_WIN_RATES, passed=rates_ok,
                                    metadata={f"{v}_win_rate": scores[f"{v}_win_rate"] for v in config.tags}),
            ],
        )  # fmt: skip

    return eval_scores
