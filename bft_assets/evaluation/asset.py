"""eval_scores[recipe]: how good is the model a recipe trained, and what did its data look like
(docs/method.md step 5).

Every declared step's checkpoint answers every evaluation instruction with each evaluation
suffix (T=0.7, top_p=0.9); a judge compares each answer with the reference answer in both
orders (``judging``) through AlpacaEval's annotator for the reference set; the scores are
AlpacaEval-style win rates (raw, with standard error, and length-controlled on AlpacaEval 2),
answer lengths, and the training set's diversity and MAUVE (``data_metrics``). The best step
stands for the recipe, as the paper reports it; further judges are reported beside it.
"""

import dagster as dg
import polars as pl

from bft_assets.evaluation.annotators import annotator, choose_annotator
from bft_assets.evaluation.answers import answer_all, eval_set, references
from bft_assets.evaluation.data_metrics import diversity, lengths, mauve_scores
from bft_assets.evaluation.judging import judge_pairs
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
    scores_by_step,
    step_table,
)
from bft_assets.evaluation.win_rates import best_steps
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
from bft_resources.eval_source import EvalSetSource
from bft_resources.models import ModelRef


def other_judges(run: StageRun, answered: pl.DataFrame, spec: EvalSpec, best: dict) -> dict:
    """Each further judge's win rate (and LC on AlpacaEval 2) per suffix at the main judge's
    best step, against its own reference set where it names one (AlpacaEval 2's GPT-4 Turbo
    outputs to the same 805 instructions, BFT Table 10)."""
    out = {}
    for other in run.inst.decl.judge.others:
        picked = pl.concat([answered.filter((pl.col("variant") == s) & (pl.col("step") == best[f"{s}_best_step"]))
                            for s in spec.tags])  # fmt: skip
        if other.references is not None:
            theirs = EvalSetSource(uri=other.references).read()
            picked = picked.drop("reference").join(
                theirs.select("instruction", "reference"), on="instruction")  # fmt: skip
        reader = annotator(other.annotator)
        judged, _ = judge_pairs(run, picked, reader, spec.batch_rows, other.engine,
                                ModelRef(model=other.served_model), other.name)  # fmt: skip
        for scores in scores_by_step(judged, spec.tags, reader).values():
            out |= {f"{s}_{what}__{other.name}": scores[f"{s}_{what}"] for s in spec.tags
                    for what in ("win_rate", "lc_win_rate")}  # fmt: skip
    return out


def build_eval_scores(inst: Instance) -> dg.AssetsDefinition:
    spec = inst.decl.eval
    if unknown := sorted(set(spec.tags) - set(EVAL_TAGS)):
        raise ValueError(f"eval.tags: unknown {unknown}; known: {sorted(EVAL_TAGS)}")
    sampling = Sampling(temperature=spec.temperature, top_p=spec.top_p,
                        max_tokens=spec.max_new_tokens, seed=spec.seed)  # fmt: skip
    declared = inst.decl.judge.annotator
    version = f"judge={annotator(declared).version if declared else 'auto'};eval-v2;" + digest(
        spec, inst.decl.judge, inst.model("judge").reference)  # fmt: skip
    every_shard = dg.AssetDep(inst.key(REWRITTEN_DATASET), partition_mapping=dg.AllPartitionMapping())  # fmt: skip

    @stage_asset(inst, EVAL_SCORES, group="evaluation", kinds={"huggingface", "polars"}, code_version=version,
                 checks=(*RULES, ALL_JUDGED, AGREEMENT, WIN_RATES), partitions=inst.recipe_partitions,
                 deps=[inst.key(FINETUNED_CHECKPOINT), every_shard, inst.key(RECIPES)],
                 gpus=max(inst.engine().gpus, inst.engine("judge").gpus))  # fmt: skip
    def eval_scores(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        """Win rate (with standard error), length-controlled win rate and answer lengths of
        the recipe's fine-tuned model against reference answers, judged pairwise in both
        orders, for each evaluation suffix and declared step; and the recipe's data."""
        run = StageRun(inst, context)
        questions, repeated = eval_set(spec)
        reader = annotator(
            choose_annotator(declared, spec.reference, questions["reference_generator"].to_list())
        )
        rows = questions.drop("reference").join(references(run, spec, questions, sampling), on=ROW_ID)  # fmt: skip
        answered, folders = answer_all(run, rows, spec, sampling)
        results, reused = judge_pairs(run, answered, reader, spec.batch_rows, inst.engine("judge"),
                                      inst.model("judge"))  # fmt: skip
        results = results.with_columns(recipe=pl.lit(run.partition))
        by_step = scores_by_step(results, spec.tags, reader)
        scores = best_steps(by_step, spec.tags)
        summary = {"recipe": run.partition, **scores, **other_judges(run, answered, spec, scores),
                   **recipe_data(run, spec)}  # fmt: skip
        run.storage.write(run.table, pl.DataFrame([summary]), partition=run.partition, suffix="summary")  # fmt: skip
        compared = recipe_summaries(inst, run.storage)
        suffix = compared["suffix"][0] if "suffix" in compared.columns else spec.tags[0]
        best = scores[f"{suffix}_best_step"]
        outputs = {(step, v): run.storage.write_text(f"{run.table}/{run.partition}.alpaca_eval/{v}.step{step}.json",
                   alpaca_eval_outputs(results.filter((pl.col("step") == step) & (pl.col("variant") == v)),
                                       f"{inst.prefix}-{run.partition}-step{step}"))
                   for step in folders for v in spec.tags}  # fmt: skip
        return run.finish(
            results, {"preference": "P(model answer better), both orders averaged", "read_by": "logprobs, text or unread"},
            rules=RULES,
            metadata={**{k: (round(v, 3) if isinstance(v, float) else v) for k, v in summary.items()},
                      **judged_metadata(results, reused), "duplicate_instructions_dropped": repeated,
                      "recipes": markdown_table(rounded(compared)), "suffix_chosen_across_recipes": suffix,
                      "win_rate_by_source": by_source(results, suffix),
                      "alpaca_eval_outputs": dg.MetadataValue.path(outputs[best, suffix]),
                      "judge": results["judge"][0], "annotator": reader.name,
                      "annotator_template": dg.MetadataValue.path(reader.source),
                      "checkpoint": dg.MetadataValue.path(str(folders[best])),
                      "checkpoint_steps": step_table(by_step, spec.tags)},
            checks=eval_checks(results, scores, spec),
        )  # fmt: skip

    return eval_scores


def recipe_data(run: StageRun, spec: EvalSpec) -> dict:
    """The recipe's training data: size, diversity, lengths and MAUVE (BFT section 5), for
    generated and external recipes alike."""
    training_set = run.storage.read(run.inst.table(FINETUNED_CHECKPOINT), run.partition, "train")
    generated = training_set.filter(pl.col("source") == "generated")
    pool = run.read_shards(REWRITTEN_DATASET)[0] if spec.mauve_texts else pl.DataFrame()
    embedder = Embedder(mauve_featurizer=spec.mauve_featurizer)
    return {**diversity(training_set, spec.diversity_sample), "generated_pairs": generated.height,
            **lengths(generated, run.inst.model("base")),
            **mauve_scores(embedder, pool, generated, spec.mauve_texts, spec.seed)}  # fmt: skip
