"""How a model is trained (docs/method.md step 4): the one declaration of the paper's training
settings. The YAML's ``training`` and ``seed_training`` (and a recipe's own ``training``)
resolve into ``TrainingSettings``; how and where a run executes is the ``Trainer``'s."""

from __future__ import annotations

from typing import Literal

import dagster as dg
from pydantic import ConfigDict, Field, field_validator, model_validator

from bft_resources.bounds import bounded, check_bounds

Protocol = Literal["separate_runs", "checkpoints"]


class TrainingSettings(dg.Model):
    """BFT's fine-tuning of a 7B model: cosine schedule, batch 32, weight decay 0.1, dropout
    0.1, lr 1e-5, and "we fine-tune for {600, 900, 1200} steps and report the highest win
    rate". What the paper leaves open is declared here, never implied: warmup (0) and how
    the three step counts are trained (``protocol``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    learning_rate: float = bounded(
        1e-5,
        gt=0,
        description="Peak learning rate of the cosine schedule (paper: 1e-5 at 7B, 5.5e-6 at 70B).",
        examples=[1e-5, 5.5e-6],
    )
    steps: list[int] = Field(
        default=[600, 900, 1200],
        description="Optimizer steps to train for, a checkpoint each; eval_scores reports every one "
        "and the best (paper, 7B: 600, 900, 1200; 70B: 1600 for 51.2K pairs, 1200 for 25.6K). "
        "Stored sorted, without repeats. A seed model keeps its last.",
        examples=[[600, 900, 1200], [1600], [3]],
        # what `dg check defs` reads (the validator below is Python's)
        json_schema_extra={"minItems": 1, "items": {"type": "integer", "minimum": 1}},
    )
    protocol: Protocol = Field(
        default="separate_runs",
        description="How several step counts are trained. separate_runs (the paper's literal "
        "reading): one run per count, each with its own cosine schedule decaying to its end. "
        "checkpoints (cheaper, this project's reading): one run to the last count, a checkpoint "
        "at each; the earlier ones are cut mid-schedule. With one count both are one run.",
    )
    batch_size: int = bounded(
        32,
        ge=1,
        description="Examples per optimizer step, over every process (micro batch x processes x "
        "accumulation; paper: 32).",
    )
    weight_decay: float = bounded(0.1, ge=0, description="AdamW weight decay (paper: 0.1).")
    dropout: float = bounded(
        0.1,
        ge=0,
        lt=1,
        description="Set on every dropout the architecture exposes; the manifest names them "
        "(paper: 0.1).",
    )
    warmup_ratio: float = bounded(
        0.0,
        ge=0,
        lt=1,
        description="Share of a run's steps warming the learning rate up (not in the paper: 0 "
        "unless declared).",
    )
    seed: int = bounded(0, ge=0, description="Initialization and data order.")

    @field_validator("steps")
    @classmethod
    def _positive_sorted_unique(cls, steps: list[int]) -> list[int]:
        if not steps or min(steps) < 1:
            raise ValueError(f"steps {steps}: at least one optimizer step, every one >= 1")
        return sorted(set(steps))

    @model_validator(mode="after")
    def _within_bounds(self) -> TrainingSettings:
        check_bounds(self)
        return self

    @property
    def max_steps(self) -> int:
        return self.steps[-1]

    def runs(self) -> list[TrainingSettings]:
        """The training runs the protocol asks for, shortest first, each declaring the steps
        it saves: one per step (``separate_runs``), or one saving at every step."""
        if self.protocol == "checkpoints" or len(self.steps) == 1:
            return [self]
        return [self.model_copy(update={"steps": [step]}) for step in self.steps]
