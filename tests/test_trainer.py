"""The trainer on a tiny random Llama: masking, full and LoRA fine-tuning, reload, the two
step protocols, padding, and the settings' validation."""

import json

import pytest

from bft_assets.prompts import llama2_inst
from bft_resources.engine import Chat, Sampling, TransformersEngine
from bft_resources.models import ModelRef
from bft_resources.trainer import (
    MANIFEST,
    PROBE_EXAMPLES,
    Trainer,
    TrainingExample,
    TrainingSettings,
    encode_example,
    prepare,
    train,
)

EXAMPLES = [
    TrainingExample(
        "What does json.dumps do?", "It serializes an object to a JSON string.", "seed"
    ),
    TrainingExample("How do I join paths?", "Use pathlib: Path('a') / 'b'.", "generated"),
    TrainingExample("Name a sorting function.", "sorted() returns a new sorted list.", "seed"),
    TrainingExample("What is a tuple?", "An immutable sequence.", "generated"),
]


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_model)


def test_without_a_chat_template_the_llama2_format_is_used(tokenizer):
    template, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        ids, mask = encode_example(tokenizer, EXAMPLES[1], fallback=llama2_inst)
        assert tokenizer.decode(ids[: mask.index(1)]).startswith(
            "[INST] How do I join paths? [/INST]"
        )
    finally:
        tokenizer.chat_template = template


@pytest.mark.parametrize("method", ["full", "lora"])
def test_fine_tuning_lowers_the_loss_and_the_checkpoint_serves(
    tiny_tokenizer_model, tmp_path, method, capfd
):
    # No dropout here: a 2-layer, 32-wide random model has too little capacity to learn through it.
    settings = TrainingSettings(learning_rate=3e-3 if method == "full" else 2e-2, steps=[12], batch_size=4,
                                warmup_ratio=0.0, dropout=0.0)  # fmt: skip
    trainer = Trainer(micro_batch_size=2, method=method, lora_r=16, lora_alpha=32, log_every=1)
    out = tmp_path / "ckpt"
    logs: list[str] = []
    result = train(str(tiny_tokenizer_model), EXAMPLES, str(out), settings, trainer, base_reference="tiny",
                   log=logs.append)  # fmt: skip
    assert result.final_loss < result.first_loss - 0.1, result.losses
    assert len(result.losses) == 12 and sum("tokens/s" in line for line in logs) == 12
    assert logs[-1].startswith("probe loss")
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["rows_by_source"] == {"seed": 2, "generated": 2}
    assert manifest["hyperparameters"]["batch_size"] == 4 and manifest["losses"] == result.losses
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    assert (out / "tokenizer_config.json").exists()
    with TransformersEngine(dtype="float32").load(str(out)) as model:
        (reply,) = model.generate(
            [Chat(EXAMPLES[0].prompt)], Sampling(temperature=0.0, max_tokens=8)
        )
    assert reply.completion_tokens > 0
    # bft's own lines say what was loaded, encoded and written; the libraries' bars stay quiet.
    printed = capfd.readouterr()
    bars = ("Loading weights", "Building labels", "Truncating train", "Writing model shards")
    assert not [bar for bar in bars if bar in printed.err + printed.out]


def test_lora_adapters_can_be_kept_separate(tiny_tokenizer_model, tmp_path):
    settings = TrainingSettings(learning_rate=1e-2, steps=[2], batch_size=2)
    trainer = Trainer(micro_batch_size=2, method="lora", merge_lora=False, lora_r=4, lora_alpha=8)
    train(str(tiny_tokenizer_model), EXAMPLES, str(tmp_path / "adapter"), settings, trainer,
          base_reference="tiny")  # fmt: skip
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert json.loads((tmp_path / "adapter" / MANIFEST).read_text())["lora_adapter_only"]


def test_no_examples_is_a_clear_error(tiny_tokenizer_model, tmp_path):
    with pytest.raises(ValueError, match="no training examples"):
        train(
            str(tiny_tokenizer_model),
            [],
            str(tmp_path / "x"),
            TrainingSettings(),
            Trainer(),
            base_reference="tiny",
        )


def test_an_example_cut_before_its_response_is_dropped_and_counted(tiny_tokenizer_model, tmp_path):
    import math

    long = TrainingExample(
        "word " * 300, "The answer.", "seed"
    )  # first: it would be in the probe set
    settings = TrainingSettings(steps=[1], batch_size=2, dropout=0.0)
    trainer = Trainer(micro_batch_size=2, max_seq_len=64)
    logs: list[str] = []
    result = train(str(tiny_tokenizer_model), [long, *EXAMPLES[:3]], str(tmp_path / "c"), settings, trainer,
                   base_reference="tiny", log=logs.append)  # fmt: skip
    assert result.dropped_examples == 1 and result.truncated_examples >= 1
    assert any(
        "1 of 4 examples have no response token within max_seq_len=64" in line for line in logs
    )
    assert math.isfinite(result.first_loss) and math.isfinite(result.final_loss)
    assert json.loads((tmp_path / "c" / MANIFEST).read_text())["dropped_examples"] == 1
    assert not (tmp_path / ".c.trainer").exists()  # the Trainer's own folder is cleared


def _manifest(folder) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def _cosine(peak: float, steps: int) -> list[float]:
    """The learning rate each step of a ``steps``-step cosine schedule trains with."""
    import math

    return [peak * 0.5 * (1 + math.cos(math.pi * k / steps)) for k in range(steps)]


def test_separate_runs_each_decay_to_their_own_end(tiny_tokenizer_model, tmp_path):
    """The paper's literal reading: a run per declared step, each with its whole cosine
    schedule; the cheaper reading: one run whose earlier checkpoint is cut mid-schedule."""
    import math

    settings = TrainingSettings(learning_rate=1e-3, steps=[4, 2], batch_size=2, dropout=0.0)
    assert settings.protocol == "separate_runs" and settings.steps == [2, 4]
    logs: list[str] = []
    result = Trainer(micro_batch_size=2).fine_tune(
        ModelRef(model=str(tiny_tokenizer_model)), EXAMPLES, str(tmp_path / "s4"), settings,
        log=logs.append, checkpoint_dirs={2: str(tmp_path / "s2")},
    )  # fmt: skip
    assert any("on the CPU" in line for line in logs if line.startswith("memory estimate"))
    assert result.checkpoints == {2: str(tmp_path / "s2"), 4: str(tmp_path / "s4")}
    assert set(result.probe_losses) == {2, 4} and all(
        map(math.isfinite, result.probe_losses.values())
    )
    assert len(result.learning_rates) == len(result.losses) == 4  # the longest run's
    for step in (2, 4):
        manifest = _manifest(tmp_path / f"s{step}")
        rates = manifest["learning_rates"]
        assert (
            manifest["protocol"] == "separate_runs"
            and manifest["step"] == manifest["run_steps"] == step
        )
        assert len(rates) == len(manifest["losses"]) == step
        # Each run's cosine schedule spans its own steps (the rate each step trained with):
        # its last rate is its smallest, at most half the peak (0.15 of it after 4 steps).
        assert rates == pytest.approx(_cosine(settings.learning_rate, step)), rates
        assert rates[-1] == min(rates) <= 0.5 * settings.learning_rate
        assert manifest["probe_loss"] == result.probe_losses[step]
    assert _manifest(tmp_path / "s4")["learning_rates"] == result.learning_rates

    one_run = settings.model_copy(update={"protocol": "checkpoints"})
    single = train(str(tiny_tokenizer_model), EXAMPLES, str(tmp_path / "c4"), one_run, Trainer(micro_batch_size=2),
                   base_reference="tiny", checkpoint_dirs={2: str(tmp_path / "c2")})  # fmt: skip
    cut, whole = _manifest(tmp_path / "c2"), _manifest(tmp_path / "c4")
    assert cut["protocol"] == "checkpoints" and cut["run_steps"] == 4 and cut["step"] == 2
    assert cut["learning_rates"] == whole["learning_rates"][:2] == single.learning_rates[:2]
    # Step 2 of a 4-step run is mid-schedule: well above where that run ends, and above the
    # end of the separate 2-step run.
    assert cut["learning_rates"] == pytest.approx(_cosine(settings.learning_rate, 4)[:2])
    assert (
        cut["learning_rates"][-1] > 0.8 * settings.learning_rate > 5 * whole["learning_rates"][-1]
    )
    assert cut["learning_rates"][-1] > _manifest(tmp_path / "s2")["learning_rates"][-1]


def test_batches_are_padded_to_their_longest_example_not_to_max_seq_len(tiny_tokenizer_model):
    """TRL's collator pads each micro-batch to its longest example; max_seq_len only cuts."""
    examples = [TrainingExample(f"Question {i}?", "word " * (3 * i + 1), "seed") for i in range(8)]
    prepared = prepare(str(tiny_tokenizer_model), examples, TrainingSettings(steps=[1], batch_size=4, dropout=0.0),
                       Trainer(micro_batch_size=4))  # fmt: skip
    assert prepared.max_seq_len == 4096 and not prepared.gradient_checkpointing
    assert len(prepared.trainer.eval_dataset) == PROBE_EXAMPLES
    small = prepare(str(tiny_tokenizer_model), examples, TrainingSettings(steps=[1], batch_size=4, dropout=0.0),
                    Trainer(micro_batch_size=2))  # fmt: skip
    assert len(small.trainer.eval_dataset) == 2  # one micro-batch: one forward pass a probe
    widths = []
    for batch in prepared.trainer.get_train_dataloader():
        longest = int(batch["attention_mask"].sum(dim=1).max())
        assert batch["input_ids"].shape[1] == longest < 100
        widths.append(longest)
    assert len(set(widths)) > 1  # each batch its own width


def test_training_settings_are_validated_sorted_and_split_into_runs():
    settings = TrainingSettings(steps=[1200, 600, 900, 600])
    assert settings.steps == [600, 900, 1200] and settings.max_steps == 1200
    assert [run.steps for run in settings.runs()] == [[600], [900], [1200]]
    (one_run,) = settings.model_copy(update={"protocol": "checkpoints"}).runs()
    assert one_run.steps == [600, 900, 1200]
    assert TrainingSettings(steps=[3]).runs() == [TrainingSettings(steps=[3])]
    defaults = TrainingSettings()  # docs/method.md step 4, 7B
    assert (defaults.learning_rate, defaults.batch_size, defaults.weight_decay, defaults.dropout,
            defaults.steps, defaults.warmup_ratio, defaults.protocol) == (1e-5, 32, 0.1, 0.1, [600, 900, 1200], 0.0,
                                                                          "separate_runs")  # fmt: skip
    for wrong in ({"steps": []}, {"steps": [0, 5]}, {"batch_size": 0}, {"learning_rate": 0.0},
                  {"warmup_ratio": 1.0}, {"dropout": -0.1}, {"weight_decay": -1.0}, {"protocol": "best"},
                  {"epochs": 3}):  # fmt: skip
        with pytest.raises(ValueError):
            TrainingSettings(**wrong)
    for wrong in ({"micro_batch_size": 0}, {"num_gpus": 0}, {"max_seq_len": 0}, {"lora_r": 0},
                  {"gpu_memory_gb": 0.0}, {"distributed": "mpi"}, {"trust_remote_code": True}):  # fmt: skip
        with pytest.raises(ValueError):
            Trainer(**wrong)
