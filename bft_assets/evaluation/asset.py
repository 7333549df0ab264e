"""eval_scores[recipe]: how good is the model a recipe trained, and what did its data look like
(docs/method.md step 5).

Every declared step's checkpoint answers every evaluation instruction with each evaluation
suffix (T=0.7, top_p=0.9); a judge compares each answer with the reference answer in both
orders (``judging``); the scores are AlpacaEval-style win rates (raw, with standard error,
and length-controlled), answer lengths, and the training set's diversity and MAUVE
(``data_metrics``). The best step stands for the recipe, as the paper reports it.
"""

import hashlib

import dagster as dg
import polars as pl

from bft_assets.checkpoint_index import verified_checkpoints
from bft_assets.evaluation.annotators import annotator
from bft_assets.evaluation.answers import answer_pass, eval_set, references
from bft_assets.evaluation.data_metrics import diversity, lengths, mauve_scores
from bft_assets.evaluation.judging import judge_pairs
from bft_assets.evaluation.lc import lc_scores
from bft_assets.evaluation.report import (
    AGREEMENT,
    ALL_JUDGED,
    RULES,
    WIN_RATES,
    alpaca_eval_outputs,
    by_source,
    eval_checks,
    judged_metadata,
    recipe_summaries,
    rounded,
    step_table,
)
from bft_assets.evaluation.win_rates import best_steps, variant_scores
from bft_assets.instance import (
    EVAL_SCORES,
    FINETUNED_CHECKPOINT,
    RECIPES,
    REWRITTEN_DATASET,
    Instance,
    digest,
)
from bft_assets.prompts import EVAL_TAGS
from bft_assets.reporting import markdown_table
from bft_assets.specs import EvalSpec
from bft_assets.stage import ROW_ID, StageRun, stage_asset
from bft_resources.embeddings import Embedder
from bft_resources.engine import Sampling
from bft_resources.models import ModelRef


def build_eval_scores(inst: Instance) -> dg.AssetsDefinition:
    spec = inst.decl.eval
    reader = annotator(inst.decl.judge.annotator)
    if unknown := sorted(set(spec.tags) - set(EVAL_TAGS)):
        raise ValueError(f"eval.tags: unknown {unknown}; known: {sorted(EVAL_TAGS)}")
    sampling = Sampling(
        temperature=spec.temperature,
        top_p=spec.top_p,
        max_tokens=spec.max_new_tokens,
        seed=spec.seed,
    )
    version = f"judge={reader.version};eval-v2;{digest(spec, inst.decl.judge, inst.model('judge').reference)}"
    every_shard = dg.AssetDep(
        inst.key(REWRITTEN_DATASET), partition_mapping=dg.AllPartitionMapping()
    )

    @stage_asset(inst, EVAL_SCORES, group="evaluation", kinds={"huggingface", "polars"}, code_version=version,
                 checks=(*RULES, ALL_JUDGED, AGREEMENT, WIN_RATES), partitions=inst.recipe_partitions,
                 deps=[inst.key(FINETUNED_CHECKPOINT), every_shard, inst.key(RECIPES)], gpus=inst.engine().gpus)  # fmt: skip
    def eval_scores(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        """Win rate (with standard error), length-controlled win rate and answer lengths of
        the recipe's fine-tuned model against reference answers, judged pairwise in both
        orders, for each evaluation suffix and declared step; and the recipe's data."""
        run = StageRun(inst, context)
        questions, repeated = eval_set(spec)
        rows = questions.drop("reference").join(
            references(run, spec, questions, sampling), on=ROW_ID
        )
        checkpoints = verified_checkpoints(
            run.storage, inst.table(FINETUNED_CHECKPOINT), run.partition
        )
        # Resumed answers must come from this very checkpoint (its hash) and eval set.
        asked = hashlib.sha256("\x00".join(rows["instruction"]).encode()).hexdigest()[:12]
        answered = []
        for step, (folder, sha) in checkpoints.items():
            with run.load(inst.engine(), ModelRef(model=str(folder))) as model:
                for suffix in spec.tags:
                    answers = run.run_pass(
                        model,
                        answer_pass(suffix, sampling, spec.batch_rows, asked),
                        rows,
                        sha,
                        f"step{step}",
                    )
                    answered.append(rows.join(answers.select(ROW_ID, "answer", "answer_tokens"), on=ROW_ID)
                                    .with_columns(variant=pl.lit(suffix), step=pl.lit(step, dtype=pl.Int64),
                                                  checkpoint_sha256=pl.lit(sha)))  # fmt: skip
        results, reused = judge_pairs(run, pl.concat(answered), reader, spec.batch_rows)
        results = results.with_columns(recipe=pl.lit(run.partition))
        by_step = {step: {k: v for suffix in spec.tags for k, v in variant_scores(
            results.filter(pl.col("step") == step), suffix, lc_scores).items()} for step in checkpoints}  # fmt: skip
        scores = best_steps(by_step, spec.tags)
        summary = {"recipe": run.partition, **scores, **recipe_data(run, spec)}
        run.storage.write(
            run.table, pl.DataFrame([summary]), partition=run.partition, suffix="summary"
        )
        compared = recipe_summaries(inst, run.storage)
        suffix = compared["suffix"][0] if "suffix" in compared.columns else spec.tags[0]
        best = scores[f"{suffix}_best_step"]
        outputs = {(step, v): run.storage.write_text(f"{run.table}/{run.partition}.alpaca_eval/{v}.step{step}.json",
                   alpaca_eval_outputs(results.filter((pl.col("step") == step) & (pl.col("variant") == v)),
                                       f"{inst.prefix}-{run.partition}-step{step}"))
                   for step in checkpoints for v in spec.tags}  # fmt: skip
        return run.finish(
            results, {"preference": "P(model answer better), both orders averaged", "read_by": "logprobs, text or unread"},
            rules=RULES,
            metadata={**{k: (round(v, 3) if isinstance(v, float) else v) for k, v in summary.items()},
                      **judged_metadata(results, reused), "duplicate_instructions_dropped": repeated,
                      "recipes": markdown_table(rounded(compared)),
                      "suffix_chosen_across_recipes": suffix, "win_rate_by_source": by_source(results, suffix),
                      "alpaca_eval_outputs": dg.MetadataValue.path(outputs[best, suffix]),
                      "judge": results["judge"][0], "annotator": reader.name,
                      "annotator_template": dg.MetadataValue.path(reader.source),
                      "checkpoint": dg.MetadataValue.path(str(checkpoints[best][0])),
                      "checkpoint_steps": step_table(by_step, spec.tags)},
            checks=eval_checks(results, scores, spec),
        )  # fmt: skip

    return eval_scores


def recipe_data(run: StageRun, spec: EvalSpec) -> dict:
    """The recipe's training data: size, diversity, lengths and MAUVE (BFT section 5)."""
    training_set = run.storage.read(run.inst.table(FINETUNED_CHECKPOINT), run.partition, "train")
    generated = training_set.filter(pl.col("source") == "generated")
    pool = run.read_shards(REWRITTEN_DATASET)[0] if spec.mauve_texts else pl.DataFrame()
    embedder = Embedder(mauve_featurizer=spec.mauve_featurizer)
    return {**diversity(training_set, spec.diversity_sample), "generated_pairs": generated.height,
            **lengths(generated, run.inst.model("base")),
            **mauve_scores(embedder, pool, generated, spec.mauve_texts, spec.seed)}  # fmt: skip
