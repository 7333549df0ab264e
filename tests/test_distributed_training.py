"""Training that scales: two CPU processes (accelerate launch, gloo) through Dagster Pipes on
a base model without a chat template; response-only masking as TRL builds it; the shipped
accelerate configs read by accelerate itself; the memory estimate that refuses what cannot fit."""

import json
import math

import dagster as dg
import pytest

from bft_assets.prompts import WEB_TAG, llama2_inst
from bft_resources.engine import Chat, Sampling, TransformersEngine
from bft_resources.models import ModelRef
from bft_resources.trainer import (
    MANIFEST,
    Trainer,
    TrainingExample,
    TrainingSettings,
    prepare,
    render_prompt,
    result_from_message,
    train,
)
from bft_resources.trainer.distributed import STRATEGIES, load_config, validated_launch
from bft_resources.trainer.memory import DoesNotFit, model_shape

from tiny_models import without_chat_template


def tag(instruction: str, line: str) -> str:
    """An instruction with its source's tag line, as the training sets carry it."""
    return f"{instruction}\n{line}"


EXAMPLES = [
    TrainingExample(tag(f"Question number {i}: what comes after {i}?", WEB_TAG), f"{i + 1} comes after {i}.", "seed")
    for i in range(16)
]  # fmt: skip
# 2 processes x micro batch 2 x accumulation 2 = batch 8: two steps per pass over the data.
# One run saving at steps 2 and 4: the trace and the schedule are those of one run.
SETTINGS = TrainingSettings(
    learning_rate=2e-3, steps=[2, 4], batch_size=8, dropout=0.0, protocol="checkpoints"
)


@pytest.fixture(scope="module")
def base_model(tiny_tokenizer_model, tmp_path_factory):
    return without_chat_template(tiny_tokenizer_model, tmp_path_factory.mktemp("base") / "model")


def _traced_steps(trace_dir, rank: int) -> dict[int, list[int]]:
    steps: dict[int, list[int]] = {}
    for line in (trace_dir / f"rank{rank}.jsonl").read_text().splitlines():
        record = json.loads(line)
        steps.setdefault(record["step"], []).extend(record["examples"])
    return steps


def test_two_processes_see_disjoint_examples_and_keep_the_single_process_schedule(
    base_model, tmp_path
):
    trainer = Trainer(num_gpus=2, launcher="subprocess", log_every=1, micro_batch_size=2)
    out, trace = tmp_path / "two", tmp_path / "trace"
    reported: list[dict] = []

    @dg.asset
    def trained(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        result = trainer.fine_tune(ModelRef(model=str(base_model)), EXAMPLES, str(out / "step4"), SETTINGS,
                                   fallback=llama2_inst, log=context.log.info, context=context,
                                   checkpoint_dirs={2: str(out / "step2")}, trace_dir=str(trace))  # fmt: skip
        reported.append(json.loads(json.dumps(result.__dict__)))
        return dg.MaterializeResult()

    assert trainer.launch_command("no")[1:3] == ["-m", "accelerate.commands.launch"]
    with dg.instance_for_test() as instance:
        run = dg.materialize([trained], instance=instance)
        logs = [e.message for e in instance.all_logs(run.run_id) if e.message]
    assert run.success
    two = result_from_message(reported[0])

    # Every optimizer step: 4 examples per process, none seen by both; two steps cover the data once.
    ranks = [_traced_steps(trace, 0), _traced_steps(trace, 1)]
    assert sorted(ranks[0]) == sorted(ranks[1]) == [1, 2, 3, 4]
    for step in range(1, 5):
        first, second = ranks[0][step], ranks[1][step]
        assert len(first) == len(second) == 4 and -1 not in first + second
        assert not set(first) & set(second), (step, first, second)
    assert sorted(ranks[0][1] + ranks[1][1] + ranks[0][2] + ranks[1][2]) == list(range(16))

    # The schedule of a single process training the same number of optimizer steps.
    one = train(str(base_model), EXAMPLES, str(tmp_path / "one4"), SETTINGS, Trainer(micro_batch_size=2),
                base_reference="tiny", fallback=llama2_inst, checkpoint_dirs={2: str(tmp_path / "one2")})  # fmt: skip
    assert len(two.learning_rates) == len(one.learning_rates) == 4
    assert two.learning_rates == pytest.approx(one.learning_rates, rel=1e-6)
    assert two.learning_rates[-1] < two.learning_rates[0]  # cosine, decaying once per step

    assert sum("step 4/4 loss" in line for line in logs) == 1  # one process reports
    manifest = json.loads((out / "step4" / MANIFEST).read_text())
    assert manifest["hyperparameters"]["processes"] == 2
    assert manifest["hyperparameters"]["accumulation_steps"] == 2
    assert json.loads((out / "step2" / MANIFEST).read_text())["step"] == 2
    assert set(two.checkpoints) == {2, 4} and math.isfinite(two.probe_losses[4])
    with TransformersEngine(dtype="float32").load(
        str(out / "step4"), fallback=llama2_inst
    ) as model:
        (reply,) = model.generate(
            [Chat("What comes after 3?")], Sampling(temperature=0.0, max_tokens=8)
        )
    assert reply.completion_tokens > 0


@pytest.mark.parametrize("template", [True, False], ids=["chat-template", "no-template"])
def test_response_only_loss_masks_every_prompt_token_and_the_tag_line(
    tiny_tokenizer_model, base_model, template
):
    model = tiny_tokenizer_model if template else base_model
    example = TrainingExample(
        tag("Explain what a list is.", WEB_TAG), "A list holds items in order.", "generated"
    )
    prepared = prepare(str(model), [example], TrainingSettings(steps=[1], batch_size=1), Trainer(micro_batch_size=1),
                       fallback=llama2_inst)  # fmt: skip
    tokenizer = prepared.trainer.processing_class
    assert bool(tokenizer.chat_template) is template
    row = prepared.trainer.train_dataset[0]  # as TRL prepared it: labels built from the mask
    ids, labels = row["input_ids"], row["labels"]
    prompt = render_prompt(tokenizer, example.prompt, llama2_inst)
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert WEB_TAG in tokenizer.decode(ids[:n_prompt])
    assert labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    learned = tokenizer.decode(labels[n_prompt:])
    assert learned.strip().startswith(example.response) and WEB_TAG not in learned
    assert tokenizer.eos_token_id in labels[n_prompt:]  # the end of turn is learned too


def test_dropout_reaches_every_dropout_and_max_seq_len_is_the_context(tiny_tokenizer_model):
    prepared = prepare(str(tiny_tokenizer_model), EXAMPLES[:2], TrainingSettings(steps=[1], batch_size=2, dropout=0.1),
                       Trainer(micro_batch_size=2))  # fmt: skip
    config = prepared.trainer.model.config
    assert prepared.dropout_set and all(
        getattr(config, name) == 0.1 for name in prepared.dropout_set
    )
    assert "attention_dropout" in prepared.dropout_set
    assert prepared.max_seq_len == config.max_position_embeddings == 4096


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_shipped_accelerate_configs_load_and_validate_offline(strategy):
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    config = load_config(strategy)
    args = validated_launch(strategy, 8, "bf16")
    assert args.num_processes == 8 and args.mixed_precision == "bf16"
    if strategy == "fsdp":
        assert args.use_fsdp and str(config.distributed_type) == "DistributedType.FSDP"
        env = prepare_multi_gpu_env(args)
        assert (
            env["FSDP_SHARDING_STRATEGY"] == "FULL_SHARD"
            and env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"
        )
    elif strategy.startswith("zero3"):
        assert args.use_deepspeed and config.deepspeed_config["zero_stage"] == 3
        args.deepspeed_fields_from_accelerate_config = ",".join(config.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
        offload = "cpu" if strategy == "zero3_offload" else "none"
        assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "3"
        assert env["ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"] == offload
    elif strategy == "ddp":
        assert args.multi_gpu and not args.use_fsdp and not args.use_deepspeed
    else:
        assert not (args.multi_gpu or args.use_fsdp or args.use_deepspeed)


@pytest.fixture(scope="module")
def llama_configs(tmp_path_factory):
    from transformers import LlamaConfig

    root = tmp_path_factory.mktemp("configs")
    shapes = {"70b": (8192, 28672, 80, 64, 8), "7b": (4096, 11008, 32, 32, 32)}  # Llama-2's
    for name, (hidden, ffn, layers, heads, kv) in shapes.items():
        LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
                    num_key_value_heads=kv, vocab_size=32000, max_position_embeddings=4096).save_pretrained(root / name)  # fmt: skip
    # Llama 3.2 1B's shape: its output head is its embedding matrix (1.24B parameters, not 1.50B).
    LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True).save_pretrained(root / "1b-tied")  # fmt: skip
    return root


def test_the_memory_estimate_refuses_70b_full_fine_tuning_on_one_80gb_gpu(llama_configs):
    logged: list[str] = []
    trainer = Trainer(gpu_memory_gb=80)
    with pytest.raises(DoesNotFit) as refused:
        trainer.check_memory(ModelRef(model=str(llama_configs / "70b")), logged.append)
    message = str(refused.value)
    assert "full fine-tuning of 69.0B on 1 GPU" in message and "80 GiB" in message
    assert "What would fit" in message
    assert (
        "lora fine-tuning" in message and "GPUs (zero3)" in message and "(zero3_offload)" in message
    )
    assert logged and logged[0].startswith("memory estimate: full fine-tuning of 69.0B")
    # The paper's 7B full fine-tune on 8 GPUs with FSDP fits.
    fsdp = Trainer(gpu_memory_gb=80, num_gpus=8, distributed="fsdp")
    fsdp.check_memory(ModelRef(model=str(llama_configs / "7b")), logged.append)
    assert "6.7B on 8 GPUs (fsdp)" in logged[-1]


def test_without_cuda_the_estimate_names_the_cpu(llama_configs):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    logged: list[str] = []
    Trainer().check_memory(
        ModelRef(model=str(llama_configs / "7b"), context_window=512), logged.append
    )
    assert logged == [logged[0]] and logged[0].startswith(
        "memory estimate: full fine-tuning of 6.7B on the CPU: ~"
    )
    assert "GPU" not in logged[0] and logged[0].endswith("(not checked)")
    two = Trainer(num_gpus=2)
    two.check_memory(ModelRef(model=str(llama_configs / "7b"), context_window=512), logged.append)
    assert "on 2 CPU processes (ddp)" in logged[-1] and "per process" in logged[-1]


def test_tied_embeddings_are_counted_once(llama_configs, tiny_tokenizer_model):
    tied = model_shape(str(llama_configs / "1b-tied"), lora_r=8)
    assert tied.parameters == 1_235_814_400 and tied.size == "1.2B"
    from transformers import AutoModelForCausalLM

    small = model_shape(str(tiny_tokenizer_model), lora_r=8)
    loaded = AutoModelForCausalLM.from_pretrained(str(tiny_tokenizer_model))
    assert small.parameters == sum(p.numel() for p in loaded.parameters())
    assert small.size.endswith("M")  # a sub-billion model is named in millions, not "0.0B"


def test_the_cpu_loss_path_equals_trl_fused_lm_head(tiny_tokenizer_model):
    """On a CPU the trainer takes the model's own loss instead of TRL's fused LM head (faster
    there); both must give the same loss on the same response-only labels."""
    losses = {}
    for fused in (True, False):
        settings = TrainingSettings(steps=[1], batch_size=4, dropout=0.0)
        trainer = Trainer(micro_batch_size=4, fused_lm_head=fused)
        prepared = prepare(
            str(tiny_tokenizer_model), EXAMPLES[:8], settings, trainer, fallback=llama2_inst
        )
        losses[fused] = prepared.trainer.evaluate()["eval_loss"]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
