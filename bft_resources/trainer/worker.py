"""The training script a run launches as a subprocess (``python -m`` or ``accelerate launch
-m`` with one of bft's accelerate configs), talking to the Dagster run through Pipes: its
progress lines go to the run log and its result comes back as a custom message.

Every process trains; only the main one (rank 0) opens the Pipes message channel, so the run
sees one stream of messages. The others read the same context (the extras) and stay quiet.
The extras carry the training settings and the trainer as their ``model_dump()``, rebuilt
here, so the subprocess trains exactly what was declared."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import asdict

import polars as pl
from dagster_pipes import PipesDefaultContextLoader, PipesEnvVarParamsLoader, open_dagster_pipes

from bft_resources.trainer.examples import TrainingExample
from bft_resources.trainer.resource import MESSAGE_SLOT, Trainer
from bft_resources.trainer.settings import TrainingSettings
from bft_resources.trainer.sft import train


@contextmanager
def _extras_only():
    params = PipesEnvVarParamsLoader().load_context_params()
    with PipesDefaultContextLoader().load_context(params) as data:
        yield data["extras"]


def main() -> None:
    if int(os.environ.get("RANK", "0")) != 0:
        with _extras_only() as spec:
            run(spec, log=lambda line: None, report=lambda result: None)
        return
    with open_dagster_pipes() as pipes:
        run(pipes.extras, log=pipes.log.info, report=pipes.report_custom_message)


def run(spec: dict, log, report) -> None:
    frame = pl.read_parquet(spec["examples"])
    examples = [
        TrainingExample(p, r, s)
        for p, r, s in frame.select("prompt", "response", "source").iter_rows()
    ]
    # The launcher sends the caller's fallback rendering as a template with a slot.
    template = spec.get("fallback_template")
    fallback = (lambda message: template.replace(MESSAGE_SLOT, message)) if template else None
    result = train(
        spec["model_dir"], examples, spec["output_dir"], TrainingSettings(**spec["settings"]),
        Trainer(**spec["trainer"]), base_reference=spec["base_reference"], fallback=fallback, log=log,
        trust_remote_code=spec["trust_remote_code"], extra_manifest=spec.get("extra_manifest"),
        checkpoint_dirs=spec.get("checkpoint_dirs"), trace_dir=spec.get("trace_dir"),
    )  # fmt: skip
    report(json.loads(json.dumps(asdict(result), default=str)))


if __name__ == "__main__":
    main()
