"""The training script a run launches as a subprocess (``python -m`` or, over several
GPUs, ``accelerate launch -m``), talking to the Dagster run through Pipes: its progress
lines go to the run log and its result comes back as a custom message."""

from __future__ import annotations

import json
from dataclasses import asdict

import polars as pl
from dagster_pipes import open_dagster_pipes

from bft_resources.trainer import MESSAGE_SLOT, Hyperparameters, TrainingExample, train


def main() -> None:
    with open_dagster_pipes() as pipes:
        spec = pipes.extras
        frame = pl.read_parquet(spec["examples"])
        examples = [
            TrainingExample(p, r, s)
            for p, r, s in frame.select("prompt", "response", "source").iter_rows()
        ]
        # The launcher sends the caller's fallback rendering as a template with a slot.
        template = spec.get("fallback_template")
        fallback = (lambda message: template.replace(MESSAGE_SLOT, message)) if template else None
        result = train(
            spec["model_dir"], examples, spec["output_dir"], Hyperparameters(**spec["hyperparameters"]),
            base_reference=spec["base_reference"], fallback=fallback, log=pipes.log.info,
            log_every=spec["log_every"], trust_remote_code=spec["trust_remote_code"],
            extra_manifest=spec.get("extra_manifest"),
        )  # fmt: skip
        pipes.report_custom_message(json.loads(json.dumps(asdict(result), default=str)))


if __name__ == "__main__":
    main()
