"""Fine-tuning (docs/method.md step 4), one declaration per setting:

- ``TrainingSettings`` (``settings``): what is trained, the paper's defaults written once
  (the YAML's ``training`` and ``seed_training`` resolve into it);
- ``Trainer`` (``resource``): how and where it runs (the YAML's ``trainer``);
- ``train``/``prepare`` (``sft``): TRL's SFTTrainer on accelerate, reading both;
- ``examples``: a pair rendered, cleaned, tokenized and masked;
- ``worker``, ``distributed``, ``memory``, ``accelerate_configs/``: the Pipes subprocess,
  the shipped accelerate configs and the memory estimate that refuses what cannot fit.
"""

from bft_resources.trainer.examples import (
    TrainingExample,
    data_hash,
    encode_example,
    plain_text,
    render_full,
    render_prompt,
)
from bft_resources.trainer.resource import MESSAGE_SLOT, Trainer
from bft_resources.trainer.settings import TrainingSettings
from bft_resources.trainer.sft import (
    MANIFEST,
    PROBE_EXAMPLES,
    Prepared,
    TrainingResult,
    accumulation_steps,
    apply_dropout,
    context_length,
    prepare,
    result_from_message,
    train,
    uses_bf16,
)

__all__ = [
    "MANIFEST",
    "MESSAGE_SLOT",
    "PROBE_EXAMPLES",
    "Prepared",
    "Trainer",
    "TrainingExample",
    "TrainingResult",
    "TrainingSettings",
    "accumulation_steps",
    "apply_dropout",
    "context_length",
    "data_hash",
    "encode_example",
    "plain_text",
    "prepare",
    "render_full",
    "render_prompt",
    "result_from_message",
    "train",
    "uses_bf16",
]
