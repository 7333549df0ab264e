"""AlpacaEval's own annotators, read from the installed alpaca-eval package: the prompt as
AlpacaEval renders it, the verdict read from a real local model's log-probabilities, and
from a real OpenAI-compatible server (`transformers serve`, which returns text only)."""

import math
from pathlib import Path

import pytest

from bft_assets.evaluation.annotators import (
    ALPACA_EVAL_1,
    ALPACA_EVAL_2,
    BFT,
    alpaca_eval_root,
    annotator,
    chatml_messages,
    fill,
    ranking_verdict,
)
from bft_assets.evaluation.judging import LOGPROBS, TEXT, read_verdicts, verdict_reading
from bft_resources.engine import EndpointEngine, Sampling, TransformersEngine
from bft_resources.models import ModelRef
from bft_resources.trainer import Trainer, TrainingExample, TrainingSettings, train

from servers import transformers_serve

PAIR = ("Name a primary colour.", "Red is a primary colour.", "Potato.")


def test_alpaca_eval_2_prompt_is_the_installed_packages_template_filled_as_alpaca_eval_fills_it():
    reader = annotator(ALPACA_EVAL_2)
    template_path = (
        alpaca_eval_root()
        / "evaluators_configs"
        / "alpaca_eval_clf_gpt4_turbo"
        / "alpaca_eval_clf.txt"
    )
    assert (
        Path(reader.source) == template_path and "site-packages" in reader.source
    )  # not a copy in bft
    template = template_path.read_text()
    chat = reader.chat(*PAIR)
    system, user = chatml_messages(
        fill(template, dict(zip(("instruction", "output_1", "output_2"), PAIR, strict=True)))
    )
    assert (chat.system, chat.user) == (system["content"], user["content"])
    assert '"instruction": """Name a primary colour."""' in chat.user
    assert '"model_identifier": "m",\n        "output": """Red is a primary colour."""' in chat.user
    assert reader.options == ("m", "M") and reader.max_tokens == 1  # as its configs.yaml says
    assert reader.from_logprobs({"m": math.log(0.2), "M": math.log(0.6)}) == pytest.approx(0.25)
    assert (
        reader.read_text("M") == 0.0
        and reader.read_text("m") == 1.0
        and reader.read_text("The") is None
    )
    assert reader.version != annotator(BFT).version


def test_alpaca_eval_1_reads_the_ranking():
    reader = annotator(ALPACA_EVAL_1)
    assert (
        reader.options is None and reader.max_tokens == 100
    )  # a written ranking, as its configs.yaml says
    assert (
        '"model": "model_1",\n        "answer": """Red is a primary colour."""'
        in reader.chat(*PAIR).user
    )
    assert (
        ranking_verdict("[{'model': 'model_1', 'rank': 2}, {'model': 'model_2', 'rank': 1}]") == 0.0
    )
    assert (
        reader.read_text("[{'model': 'model_1', 'rank': 1}, {'model': 'model_2', 'rank': 2}]")
        == 1.0
    )
    assert reader.read_text("model_1 is better") is None


@pytest.mark.slow
def test_alpaca_eval_2_verdict_from_a_local_models_logprobs(smollm2):
    reader = annotator(ALPACA_EVAL_2)
    chats = [reader.chat(*PAIR), reader.chat(PAIR[0], PAIR[2], PAIR[1])]
    with TransformersEngine(dtype="float32").load(smollm2) as model:
        assert verdict_reading(model, chats[0], reader) == LOGPROBS
        verdicts = read_verdicts(model, chats, LOGPROBS, reader)
        # The same batch as the verdicts': a batch of one pads differently, and float32 sums
        # over a different shape differ in the 7th digit with more than one thread.
        both = model.option_logprobs(chats, ("m", "M"))
    for verdict, logprobs in zip(verdicts, both, strict=True):
        m, big_m = math.exp(logprobs["m"]), math.exp(logprobs["M"])
        assert verdict == pytest.approx(m / (m + big_m)) and 0.0 < verdict < 1.0


@pytest.fixture(scope="module")
def identifier_judge(tiny_tokenizer_model, tmp_path_factory):
    """A tiny model trained to answer the AlpacaEval 2 annotator with an identifier ("M"):
    a real model whose written verdict can be read, served by a real server."""
    reader = annotator(ALPACA_EVAL_2)
    pairs = [PAIR, ("Name a fruit.", "Apple.", "Stone."), ("Say hi.", "Hi!", "No.")]
    examples = [TrainingExample(reader.chat(*p).user, "M", "seed") for p in pairs]
    out = tmp_path_factory.mktemp("judge") / "identifier-judge"
    train(str(tiny_tokenizer_model), examples, str(out),
          TrainingSettings(learning_rate=3e-3, steps=[30], batch_size=3, dropout=0.0), Trainer(micro_batch_size=3),
          base_reference="tiny")  # fmt: skip
    return out


def test_alpaca_eval_2_verdict_through_an_openai_compatible_server(identifier_judge, tmp_path):
    reader = annotator(ALPACA_EVAL_2)
    chats = [
        reader.chat("Name a planet.", "Mars.", "Soup."),
        reader.chat("Name a planet.", "Soup.", "Mars."),
    ]
    with TransformersEngine(dtype="float32").load(str(identifier_judge)) as local:
        (reply,) = local.generate(chats[:1], Sampling(temperature=0.0, top_p=1.0, max_tokens=1))
    assert reply.text == "M"
    with transformers_serve(identifier_judge, tmp_path / "serve.log") as url:
        judge = EndpointEngine(base_url=url)
        with judge.load(ModelRef(model=str(identifier_judge))) as remote:
            assert (
                verdict_reading(remote, chats[0], reader) == TEXT
            )  # transformers serve returns no logprobs
            assert read_verdicts(remote, chats, TEXT, reader) == [
                0.0,
                0.0,
            ]  # "M": the second output


def test_eval_scores_judges_with_the_declared_alpaca_eval_annotator(tmp_path, tiny_tokenizer_model):
    import json

    import dagster as dg
    import polars as pl
    from instances import declare, materialize, node, place_checkpoint

    from bft_assets.instance import EVAL_SCORES, FINETUNED_CHECKPOINT
    from bft_resources.storage import LocalStorage

    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps({"instruction": f"Name thing {i}.", "output": f"Thing {i}."}) + "\n"
                                 for i in range(3)))  # fmt: skip
    inst = declare(tmp_path, str(tiny_tokenizer_model), engine={"dtype": "float32"}, judge={"annotator": ALPACA_EVAL_2},
                   recipes=[{"name": "seed_only", "responses": "none"}],
                   eval={"uri": str(eval_file), "max_new_tokens": 4, "mauve_texts": 0, "min_agreement": 0.0,
                         "tags": ["assistant"]})  # fmt: skip
    storage = LocalStorage(root=str(tmp_path / "storage"))
    place_checkpoint(
        storage,
        inst.table(FINETUNED_CHECKPOINT),
        "seed_only",
        tiny_tokenizer_model,
        {"recipe": "x"},
    )
    storage.write(inst.table(FINETUNED_CHECKPOINT), pl.DataFrame({"source": ["seed"], "instruction": ["q"],
                  "response": ["a"]}), partition="seed_only", suffix="train")  # fmt: skip
    with dg.instance_for_test() as instance:
        result = materialize(inst, [EVAL_SCORES], instance, partition_key="seed_only")
    meta = result.asset_materializations_for_node(node(inst, EVAL_SCORES))[0].metadata
    assert meta["annotator"].value == ALPACA_EVAL_2
    assert meta["annotator_template"].value == annotator(ALPACA_EVAL_2).source
    assert (
        "| logprobs | 3 |" in meta["read_by"].value
    )  # both orders read from the m/M log-probabilities
