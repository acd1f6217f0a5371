"""`heal`: fine-tune a (pruned) checkpoint briefly and write the result as a plain checkpoint.

- lora (default): the SLM paper's recovery recipe (its code follows LLM-Pruner): LoRA r=8, alpha=16,
  dropout 0.05 on q, k, v, o, gate, up and down projections, AdamW at lr 1e-4, sequences cut at 256
  tokens. The adapters are merged into the weights at the end (and also saved in OUT/adapter).
- partial: Lu et al. (2024), "Reassessing layer pruning in LLMs": train only lm_head and the last 3
  blocks. With tied embeddings lm_head is the embedding matrix, which then trains too.

Resumable: every `save_every` steps the trainable tensors, the optimizer state and the losses go to a
work folder (default: next to OUT); a rerun with the same options continues from there. Each step's
batch and dropout noise depend only on the seed and the step, so a resumed run equals an
uninterrupted one (on the same kind of device: CPU and CUDA draw dropout noise from different
generators, and a run may resume on another device). The work folder is removed once OUT is complete.

Training runs in float32 on `device` (a GPU for anything beyond a small model); the result is written
back in the checkpoint's own dtype.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from slm_fast.checkpoint.staging import (
    SpaceNeed,
    check_output_location,
    copy_tagalong_files,
    ensure_free_space_for,
    staged_folder,
    tagalong_files,
)
from slm_fast.devices import check_device
from slm_fast.errors import InputError
from slm_fast.healing.curve import plot_loss_curve
from slm_fast.healing.data import batch_for_step, training_windows

MODES = ("lora", "partial")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED_TARGETS = ("qkv_proj", "gate_up_proj")  # Phi-3's fused projections stand for the same ones
REPORT_NAME = "heal_report.json"
CURVE_NAME = "loss_curve.png"
STATE_NAME = "state.pt"
# torch.save's zip record, pickle entry and key name around each tensor: about 400 bytes measured.
SAVED_TENSOR_OVERHEAD = 1024
# The loss curve PNG (about 40 kB), config.json, the adapter's card, and the report's line per step.
REPORT_BYTES, REPORT_BYTES_PER_STEP = 256 * 1024, 32


@dataclass
class HealOptions:
    mode: str = "lora"
    corpus: str = "brown"  # neither the validation (Emma, LAMBADA) nor the held-out (P&P, BoolQ) texts
    steps: int = 200
    batch_size: int = 4
    cutoff: int = 256
    lr: float = 1e-4
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    partial_blocks: int = 3
    seed: int = 1234
    device: str = "cpu"
    save_every: int = 25
    work: Path | None = None  # default: OUT's parent / .OUT.heal-work
    overwrite: bool = False
    progress: bool = True

    def validated(self) -> HealOptions:
        if self.mode not in MODES:
            raise InputError(f"unknown healing mode {self.mode!r}; choose one of: {', '.join(MODES)}")
        for name in ("steps", "batch_size", "lora_r", "partial_blocks", "save_every"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.cutoff < 2:
            raise InputError(f"--cutoff must be >= 2, got {self.cutoff}")
        if not self.lr > 0 or not 0 <= self.lora_dropout < 1:
            raise InputError(f"need --lr > 0 and 0 <= --lora-dropout < 1, got {self.lr} and {self.lora_dropout}")
        return self

    def fingerprint(self) -> str:
        """What a resumed run must share with the interrupted one."""
        ignored = ("work", "overwrite", "progress", "save_every", "device")
        fields = {k: v for k, v in asdict(self).items() if k not in ignored}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class HealReport:
    output: Path
    mode: str
    steps: int
    trainable_parameters: int
    first_loss: float
    last_loss: float
    seconds: float
    resumed_from: int = 0
    losses: list[float] = field(default_factory=list, repr=False)

    def summary(self) -> str:
        head, tail = _mean(self.losses[:10]), _mean(self.losses[-10:])
        resumed = f" (resumed at step {self.resumed_from})" if self.resumed_from else ""
        return (
            f"healed ({self.mode}, {self.trainable_parameters / 1e6:,.2f}M trainable) for {self.steps} steps"
            f"{resumed}: loss {head:.3f} -> {tail:.3f} (mean of the first and last 10 steps); "
            f"{self.seconds:.1f} s; wrote {self.output}"
        )


def heal(source: str | Path, output: str | Path, options: HealOptions) -> HealReport:
    started = time.perf_counter()
    options.validated()
    device = check_device(options.device)
    source, output = Path(source), Path(output)
    if not (source / "config.json").is_file():
        raise InputError(f"{source} is not a checkpoint folder (no config.json)")
    check_output_location(source, output, overwrite=options.overwrite)
    work = options.work or output.resolve().parent / f".{output.name}.heal-work"
    windows = training_windows(source, options.corpus, options.cutoff)

    model, dtype = _load(source)
    checkpoint_bytes = sum(p.numel() for p in model.parameters()) * dtype.itemsize
    model.to(device)
    torch.manual_seed(options.seed)  # LoRA's A matrices are drawn at random (on the device's generator)
    model = prepare(model, options)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=options.lr)
    start, losses = _resume(work, model, optimizer, options)
    for needs_at_once in _space_needs(source, output, work, options, start, checkpoint_bytes, trainable):
        ensure_free_space_for(needs_at_once)

    model.train()
    bar = tqdm(
        total=options.steps, initial=start, desc=f"healing ({options.mode})", unit="step", disable=not options.progress
    )
    for step in range(start, options.steps):
        batch = batch_for_step(windows, step, options.batch_size, options.seed).to(device)
        losses.append(train_step(model, optimizer, batch, options.seed + step))
        bar.update()
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if _saves_after(step, options):
            _save_state(work, model, optimizer, losses, options)
    bar.close()

    report = HealReport(
        output=output.resolve(),
        mode=options.mode,
        steps=options.steps,
        trainable_parameters=sum(p.numel() for p in trainable),
        first_loss=losses[0],
        last_loss=losses[-1],
        seconds=time.perf_counter() - started,
        resumed_from=start,
        losses=losses,
    )
    with staged_folder(output, overwrite=options.overwrite) as staging:
        model.eval()
        if options.mode == "lora":
            model.save_pretrained(staging / "adapter")
        merged(model).to("cpu", dtype).save_pretrained(staging, safe_serialization=True)
        copy_tagalong_files(source, staging)
        plot_loss_curve(losses, staging / CURVE_NAME, title=f"{source.name}: {options.mode} healing")
        record = {"source": str(source.resolve()), "options": asdict(options) | {"work": str(work)}, **asdict(report)}
        record["output"] = str(report.output)
        (staging / REPORT_NAME).write_text(json.dumps(record, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return report


def _saves_after(step: int, options: HealOptions) -> bool:
    """Whether the resumable state is saved after `step` (not after the last: the output follows)."""
    return (step + 1) % options.save_every == 0 and step + 1 < options.steps


def _space_needs(
    source: Path, output: Path, work: Path, options: HealOptions, start: int, checkpoint_bytes: int, trainable
) -> tuple[list[SpaceNeed], list[SpaceNeed]]:
    """What the run adds to the disk at its two peaks, checked before training so that a full disk does
    not end hours of it with torch.save's error. While training: the resumable state (the float32
    trainable tensors and AdamW's two moments), two copies while a save replaces an earlier one (one
    when resuming: the earlier is already on disk). While writing the output: the healed checkpoint
    (weights in the stored dtype, LoRA's float32 adapter, the tag-along files, the report), beside the
    last state, which is kept until the checkpoint is complete."""
    trained_bytes = sum(p.numel() for p in trainable) * 4
    state_bytes = 3 * (trained_bytes + len(trainable) * SAVED_TENSOR_OVERHEAD)
    adapter_bytes = trained_bytes if options.mode == "lora" else 0
    tagalong_bytes = sum(path.stat().st_size for path in tagalong_files(source))
    report_bytes = REPORT_BYTES + REPORT_BYTES_PER_STEP * options.steps
    saves = sum(_saves_after(step, options) for step in range(start, options.steps))
    new_states = min(saves, 1 if start else 2)
    kept_states = 0 if start else min(saves, 1)
    state = f"the resumable state in {work}"
    checkpoint = checkpoint_bytes + adapter_bytes + tagalong_bytes + report_bytes
    return (
        [SpaceNeed(state, work, new_states * state_bytes)],
        [SpaceNeed("the healed checkpoint", output, checkpoint), SpaceNeed(state, work, kept_states * state_bytes)],
    )


def _load(source: Path) -> tuple[nn.Module, torch.dtype]:
    """The model in float32 for training, and its stored dtype to write it back in."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype="auto")
    stored = next(model.parameters()).dtype
    return model.float(), stored


def prepare(model: nn.Module, options: HealOptions) -> nn.Module:
    """LoRA adapters on the projections, or everything frozen but lm_head and the last blocks."""
    if options.mode == "lora":
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as exc:
            raise InputError("LoRA healing needs peft: pip install 'slm-fast[heal]' (or use --partial)") from exc

        names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
        targets = sorted(names & set(LORA_TARGETS + FUSED_TARGETS))
        if not targets:
            raise InputError(f"no LoRA target projections ({', '.join(LORA_TARGETS)}) in {type(model).__name__}")
        config = LoraConfig(
            r=options.lora_r,
            lora_alpha=options.lora_alpha,
            lora_dropout=options.lora_dropout,
            target_modules=targets,
            bias="none",
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, config)
    layers = model.model.layers
    if options.partial_blocks > len(layers):
        raise InputError(f"--partial-blocks {options.partial_blocks} exceeds the model's {len(layers)} blocks")
    model.requires_grad_(False)
    model.lm_head.requires_grad_(True)
    for layer in layers[len(layers) - options.partial_blocks :]:
        layer.requires_grad_(True)
    return model


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor, seed: int) -> float:
    """One AdamW step on the causal-LM loss of `batch`; the dropout noise is seeded by `seed`."""
    torch.manual_seed(seed)
    loss = model(input_ids=batch, labels=batch).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def merged(model: nn.Module) -> nn.Module:
    """A plain transformers model: LoRA adapters folded into the weights (W + alpha / r * B A)."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def _save_state(work: Path, model: nn.Module, optimizer, losses: list[float], options: HealOptions) -> None:
    work.mkdir(parents=True, exist_ok=True)
    state = {
        "fingerprint": options.fingerprint(),
        "step": len(losses),
        "losses": list(losses),
        "trainable": _trainable_state(model),
        "optimizer": optimizer.state_dict(),
    }
    partial = work / f"{STATE_NAME}.partial"
    torch.save(state, partial)
    partial.replace(work / STATE_NAME)


def _resume(work: Path, model: nn.Module, optimizer, options: HealOptions) -> tuple[int, list[float]]:
    path = work / STATE_NAME
    if not path.is_file():
        return 0, []
    state = torch.load(path, weights_only=True, map_location="cpu")
    if state["fingerprint"] != options.fingerprint():
        raise InputError(
            f"{path} belongs to a healing run with other options; rerun with those, or delete {work} to start over"
        )
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state["trainable"].items():
            parameters[name].copy_(tensor)
    optimizer.load_state_dict(state["optimizer"])
    return state["step"], list(state["losses"])


def _mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)
