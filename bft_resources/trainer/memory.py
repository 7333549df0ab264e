"""Will a fine-tune fit? A per-GPU memory estimate made from the model's config alone (no
weights loaded), written to the run log before training, and a refusal that says what
would fit instead.

Parameters are counted exactly on an empty (meta-device) model with accelerate's
``init_empty_weights``. Model state per parameter, with AdamW: weights + gradients + two
moments in the weight dtype (8 bytes in bf16, 16 in fp32); LoRA adds that for its adapters
only. Sharded strategies (FSDP full-shard, ZeRO-3) divide the model state by the process
count; ZeRO-3 offload moves it to CPU RAM. Activations with gradient checkpointing: each
layer's input (2·s·b·h bytes in 16-bit) plus one layer recomputed in full, 34·s·b·h bytes
(Korthikanti et al. 2022, without the s² attention scores that SDPA/flash attention never
stores), plus the logits and their gradient in fp32.
DeepSpeed's own estimator needs deepspeed installed and covers ZeRO only, hence this.
On a CPU (no CUDA and no declared GPU memory) the same estimate, for the machine's RAM and
without the CUDA floor, is logged and not checked.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from bft_resources.trainer.distributed import SHARDED

GIB = 1024**3
# CUDA context, allocator fragmentation and communication buffers: a floor plus a share.
OVERHEAD_GIB = 2.0
OVERHEAD_SHARE = 0.10


class DoesNotFit(RuntimeError):
    """The declared fine-tune needs more GPU memory than the GPUs have."""


@dataclass(frozen=True)
class ModelShape:
    parameters: int
    lora_parameters: int  # adapter parameters at the declared rank (all linear layers)
    hidden: int
    layers: int
    vocab: int

    @property
    def billions(self) -> float:
        return self.parameters / 1e9

    @property
    def size(self) -> str:
        """As models are named: 6.7B, 135M."""
        return f"{self.billions:.1f}B" if self.billions >= 1 else f"{self.parameters / 1e6:.3g}M"


def model_shape(model_dir: str, *, lora_r: int, trust_remote_code: bool = False) -> ModelShape:
    """Count a model's parameters from its config, on the meta device."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    # On the meta device the output head is not yet tied to the embeddings: counted apart, a
    # tied model (SmolLM2, Llama 3.2 1B/3B) would be a vocabulary x hidden matrix larger.
    model.tie_weights()
    parameters = sum(p.numel() for p in model.parameters())
    lora = sum(
        lora_r * (m.in_features + m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")
    )
    text = getattr(config, "text_config", config)
    return ModelShape(
        parameters=parameters,
        lora_parameters=lora,
        hidden=int(text.hidden_size),
        layers=int(text.num_hidden_layers),
        vocab=int(text.vocab_size),
    )


@dataclass(frozen=True)
class Plan:
    """One way to run a fine-tune, and what it needs."""

    method: str  # full | lora
    strategy: str
    gpus: int
    micro_batch_size: int
    seq_len: int
    bf16: bool = True
    gradient_checkpointing: bool = True
    device: Literal["gpu", "cpu"] = "gpu"  # cpu: processes on the machine's RAM, no CUDA context


@dataclass(frozen=True)
class Estimate:
    plan: Plan
    shape: ModelShape
    model_state_gib: float  # weights, gradients, optimizer moments, all processes together
    per_gpu_gib: float
    cpu_gib: float  # offloaded model state (ZeRO-3 offload)

    def fits(self, gpu_gib: float) -> bool:
        return self.per_gpu_gib <= gpu_gib

    def describe(self) -> str:
        p = self.plan
        what = f"{p.method} fine-tuning of {self.shape.size}"
        # Batches are padded to their longest example: the figure is for the longest allowed.
        worst = f" at most (micro batches of {p.micro_batch_size} x {p.seq_len:,} tokens)"
        if p.device == "cpu":
            if p.gpus == 1:
                return f"{what} on the CPU: ~{self.per_gpu_gib:.0f} GiB{worst}"
            return f"{what} on {p.gpus} CPU processes ({p.strategy}): ~{self.per_gpu_gib:.0f} GiB per process{worst}"
        where = f"{p.gpus} GPU{'s' if p.gpus > 1 else ''} ({p.strategy})"
        cpu = f", {self.cpu_gib:.0f} GiB of CPU RAM" if self.cpu_gib else ""
        return f"{what} on {where}: ~{self.per_gpu_gib:.0f} GiB per GPU{cpu}{worst}"


def estimate(shape: ModelShape, plan: Plan) -> Estimate:
    weight_bytes = 2 if plan.bf16 else 4
    if plan.method == "lora":
        # Frozen weights, plus adapters trained in full precision with AdamW.
        state = shape.parameters * weight_bytes + shape.lora_parameters * 16
    else:
        state = shape.parameters * weight_bytes * 4
    s, b, h = plan.seq_len, plan.micro_batch_size, shape.hidden
    one_layer = 34 * s * b * h
    if plan.gradient_checkpointing:
        activations = 2 * s * b * h * shape.layers + one_layer
    else:
        activations = one_layer * shape.layers
    logits = s * b * shape.vocab * 4 * 2
    cpu = 0.0
    if plan.strategy == "zero3_offload":
        on_gpu = 2 * shape.parameters * weight_bytes / max(1, shape.layers)  # a layer gathered
        cpu = state / GIB
    elif plan.strategy in SHARDED:
        on_gpu = state / plan.gpus
    else:
        on_gpu = state
    working = on_gpu + activations + logits
    floor = OVERHEAD_GIB if plan.device == "gpu" else 0.0  # the CUDA context and its buffers
    per_gpu = working * (1 + OVERHEAD_SHARE) / GIB + floor
    return Estimate(plan, shape, state / GIB, per_gpu, cpu)


def alternatives(
    shape: ModelShape, plan: Plan, gpu_gib: float, max_gpus: int = 512
) -> list[Estimate]:
    """What would fit instead: LoRA where the plan is full fine-tuning, the fewest GPUs a
    sharded full fine-tune needs, and ZeRO-3 with CPU offload."""
    found: list[Estimate] = []
    if plan.method == "full":
        lora = estimate(shape, replace(plan, method="lora"))
        if lora.fits(gpu_gib):
            found.append(lora)
        else:
            sharded_lora = _fewest_gpus(
                shape, replace(plan, method="lora", strategy="fsdp"), gpu_gib, max_gpus
            )
            if sharded_lora:
                found.append(sharded_lora)
    sharded = _fewest_gpus(shape, replace(plan, strategy="fsdp" if shape.billions < 30 else "zero3"), gpu_gib, max_gpus)  # fmt: skip
    if sharded:
        found.append(sharded)
    offload = estimate(shape, replace(plan, strategy="zero3_offload"))
    if offload.fits(gpu_gib):
        found.append(offload)
    return found


def _fewest_gpus(shape: ModelShape, plan: Plan, gpu_gib: float, max_gpus: int) -> Estimate | None:
    gpus = max(2, plan.gpus)
    while gpus <= max_gpus:
        candidate = estimate(shape, replace(plan, gpus=gpus))
        if candidate.fits(gpu_gib):
            return candidate
        gpus *= 2
    return None


def require_fit(found: Estimate, gpu_gib: float) -> None:
    """Raise DoesNotFit, naming what would fit, when the estimate exceeds the GPU memory."""
    if found.fits(gpu_gib):
        return
    options = alternatives(found.shape, found.plan, gpu_gib)
    would = "; ".join(o.describe() for o in options) or "nothing bft ships; use a smaller model"
    raise DoesNotFit(
        f"{found.describe()}, but each GPU has {gpu_gib:.0f} GiB. "
        f"What would fit: {would}. Set trainer.method (lora), trainer.num_gpus and "
        f"trainer.distributed (fsdp, zero3, zero3_offload) accordingly."
    )
