"""The trainer on a tiny random Llama: masking, full and LoRA fine-tuning, reload."""

import json

import pytest

from bft_assets.prompts import llama2_inst
from bft_resources.engine import Chat, InferenceEngine, Sampling
from bft_resources.trainer import (
    MANIFEST,
    Hyperparameters,
    TrainingExample,
    encode_example,
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
    tiny_tokenizer_model, tmp_path, method
):
    # No dropout here: a 2-layer, 32-wide random model has too little capacity to learn through it.
    hp = Hyperparameters(learning_rate=3e-3 if method == "full" else 2e-2, steps=(12,), batch_size=4,
                         micro_batch_size=2, warmup_ratio=0.0, dropout=0.0, method=method, lora_r=16,
                         lora_alpha=32)  # fmt: skip
    out = tmp_path / "ckpt"
    logs: list[str] = []
    result = train(
        str(tiny_tokenizer_model), EXAMPLES, str(out), hp, base_reference="tiny", log=logs.append
    )
    assert result.final_loss < result.first_loss - 0.1, result.losses
    assert len(result.losses) == 12 and sum("tokens/s" in line for line in logs) == 12
    assert logs[-1].startswith("probe loss")
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["rows_by_source"] == {"seed": 2, "generated": 2}
    assert manifest["hyperparameters"]["batch_size"] == 4 and manifest["losses"] == result.losses
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    assert (out / "tokenizer_config.json").exists()
    with InferenceEngine(dtype="float32").load(str(out)) as model:
        (reply,) = model.generate(
            [Chat(EXAMPLES[0].prompt)], Sampling(temperature=0.0, max_tokens=8)
        )
    assert reply.completion_tokens > 0


def test_lora_adapters_can_be_kept_separate(tiny_tokenizer_model, tmp_path):
    hp = Hyperparameters(learning_rate=1e-2, steps=(2,), batch_size=2, micro_batch_size=2, method="lora",
                         merge_lora=False, lora_r=4, lora_alpha=8)  # fmt: skip
    train(str(tiny_tokenizer_model), EXAMPLES, str(tmp_path / "adapter"), hp, base_reference="tiny")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert json.loads((tmp_path / "adapter" / MANIFEST).read_text())["lora_adapter_only"]


def test_no_examples_is_a_clear_error(tiny_tokenizer_model, tmp_path):
    with pytest.raises(ValueError, match="no training examples"):
        train(
            str(tiny_tokenizer_model),
            [],
            str(tmp_path / "x"),
            Hyperparameters(),
            base_reference="tiny",
        )


def test_an_example_cut_before_its_response_is_dropped_and_counted(tiny_tokenizer_model, tmp_path):
    import math

    long = TrainingExample(
        "word " * 300, "The answer.", "seed"
    )  # first: it would be in the probe set
    hp = Hyperparameters(steps=(1,), batch_size=2, micro_batch_size=2, max_seq_len=64, dropout=0.0)
    logs: list[str] = []
    result = train(str(tiny_tokenizer_model), [long, *EXAMPLES[:3]], str(tmp_path / "c"), hp,
                   base_reference="tiny", log=logs.append)  # fmt: skip
    assert result.dropped_examples == 1 and result.truncated_examples >= 1
    assert any(
        "1 of 4 examples have no response token within max_seq_len=64" in line for line in logs
    )
    assert math.isfinite(result.first_loss) and math.isfinite(result.final_loss)
    assert json.loads((tmp_path / "c" / MANIFEST).read_text())["dropped_examples"] == 1
    assert not (tmp_path / ".c.trainer").exists()  # the Trainer's own folder is cleared
