"""Training one LoRA adapter on a shard's samples (TALLRec, Eq. 4): the loss on the answer tokens,
seeded and reproducible, with early stopping on validation AUC.

`train_adapter` owns its model: it wraps a structural copy of the frozen base model
(`Backbone.fork_model`, weights shared read-only) in its own peft model, so a scorer serving from
the same `Backbone` is never touched, and it runs under a forked torch RNG, so no global seed
changes. Model directories (K adapters with manifests) live in `apa.modeldir`; building and
unlearning them in `apa.sharded`.
"""

from __future__ import annotations

import enum
import logging
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from apa.backbone import (
    Backbone,
    last_hidden_state,
    native_bf16,
    progress_bar,
    unwrap_causal_lm,
    with_positions,
)
from apa.data import Sample
from apa.metrics import auc
from apa.shared_prefix import (
    common_prefix_length,
    run_prefix,
    score_shared_prefix,
    suffix_batch,
    suffix_hidden,
)

log = logging.getLogger(__name__)

Preset = Literal["cpu", "tallrec"]


@dataclass(frozen=True)
class TrainConfig:
    lora_r: int = 8
    """LoRA rank r (TALLRec: 8)."""
    lora_alpha: int = 16
    """LoRA alpha; the update is scaled by alpha / r (TALLRec: 16)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input during training (TALLRec: 0.05)."""
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    """Linear layers that get a LoRA adapter (TALLRec: q_proj, v_proj)."""
    lr: float = 1e-4
    """AdamW learning rate (TALLRec: 1e-4; the CPU preset uses 5e-4)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    epochs: int = 200
    """Maximum epochs (TALLRec: 200 with early stopping; the CPU preset uses 3)."""
    batch_size: int = 8
    """Samples per optimizer step."""
    micro_batch_size: int = 8
    """Samples per forward pass (gradient accumulation when smaller than batch_size)."""
    patience: int = 2
    """Early stopping: epochs without a better validation AUC before stopping."""
    valid_eval_size: int | None = 200
    """Validation samples used for early stopping (None: all)."""
    seed: int = 0
    """Seed for LoRA init, data order and dropout: retraining on the same data reproduces the adapter."""
    bf16_autocast: bool = field(default_factory=lambda: native_bf16())
    """Train under bf16 autocast (loss and Yes/No logits in fp32); default: where bf16 is native."""
    top_layers: int | None = None
    """LoRA only on the top N transformer layers (None: all layers); a speed/quality trade-off."""
    group_by_length: bool = False
    """Form each step's batch from samples of similar length (less padding); batch order stays random."""
    shared_prefix: bool = True
    """Run a micro-batch's common prompt tokens (the template, ~70 of ~220) once, and score validation
    the same way: the same loss and gradients without dropout; LoRA dropout masks on those tokens
    are then shared by the micro-batch's rows."""

    def __post_init__(self) -> None:
        for name in ("lora_r", "lora_alpha", "epochs", "batch_size", "micro_batch_size", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.batch_size % self.micro_batch_size:
            raise ValueError("batch_size must be a multiple of micro_batch_size")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module")

    @classmethod
    def preset(cls, name: Preset, **overrides: Any) -> TrainConfig:
        """`tallrec`: the paper's settings (GPU). `cpu`: tuned for 2 CPU cores (lr 5e-4, 3 epochs)."""
        base = {"cpu": {"lr": 5e-4, "epochs": 3, "batch_size": 8, "patience": 1}, "tallrec": {}}
        if name not in base:
            raise ValueError(f"preset must be one of {sorted(base)}, got {name!r}")
        return cls(**{**base[name], **{k: v for k, v in overrides.items() if v is not None}})

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs.setdefault("shared_prefix", False)  # recorded before the field existed: trained without it
        if "target_modules" in kwargs:
            kwargs["target_modules"] = tuple(kwargs["target_modules"])
        return cls(**kwargs)


# -- the loss on the answer tokens -------------------------------------------------------------


def _answer_rows(
    backbone: Backbone, samples: Sequence[Sample]
) -> tuple[list[list[int]], list[list[int]], bool]:
    """(prompt ids, answer ids + EOS, whether any prompt was cut) per sample; a prompt loses its
    first tokens when prompt + answer exceed the backbone's max_length."""
    tok = backbone.tokenizer
    prompts: list[list[int]] = []
    answers: list[list[int]] = []
    cut = False
    for sample in samples:
        prompt_ids = list(tok(sample.prompt, add_special_tokens=True)["input_ids"])
        answer_ids = list(tok(sample.output, add_special_tokens=False)["input_ids"]) + [int(tok.eos_token_id)]
        keep = backbone.config.max_length - len(answer_ids)
        cut = cut or len(prompt_ids) > keep
        prompts.append(prompt_ids[-keep:])
        answers.append(answer_ids)
    return prompts, answers, cut


def answer_batch(
    backbone: Backbone, samples: Sequence[Sample], shared_prefix: bool = False
) -> dict[str, torch.Tensor]:
    """The prompt+answer+EOS ids of `samples` with `labels` (span columns: -100 except the answer
    tokens, right-aligned). Every row's answer ends its row, so logits are needed only there.

    Plain layout: left-padded rows. With `shared_prefix` (and at least two rows sharing a token,
    none cut): `prefix_ids` (1, P) holds the prompts' common tokens and `input_ids` the rest, padded
    between prefix and suffix (`apa.shared_prefix.suffix_batch`). Either way the answer ends every
    row at the last position."""
    prompts, answers, cut = _answer_rows(backbone, samples)
    span = max(len(a) for a in answers)
    labels = torch.full((len(prompts), span), -100, dtype=torch.long)
    for i, ans in enumerate(answers):
        labels[i, span - len(ans) :] = torch.tensor(ans)
    shared = common_prefix_length(prompts) if shared_prefix and len(prompts) > 1 and not cut else 0
    if shared > 0:
        rows = [p[shared:] + a for p, a in zip(prompts, answers, strict=True)]
        batch = suffix_batch(
            rows, shared, int(backbone.tokenizer.pad_token_id), backbone.device, left_pad=True
        )
        del batch["lengths"]
        batch["prefix_ids"] = torch.tensor([prompts[0][:shared]], device=backbone.device)
        batch["labels"] = labels.to(backbone.device)
        return batch
    rows = [p + a for p, a in zip(prompts, answers, strict=True)]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), int(backbone.tokenizer.pad_token_id), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return backbone.to_device(
        with_positions({"input_ids": input_ids, "attention_mask": mask, "labels": labels})
    )


def answer_loss(
    backbone: Backbone, model: nn.Module, batch: dict[str, torch.Tensor], bf16: bool | None = None
) -> torch.Tensor:
    """Eq. 4: mean negative log-likelihood of the answer tokens. The LM head runs only on the
    positions that predict answer tokens (full-vocabulary logits everywhere cost 1.6x a step).
    A shared-prefix batch runs its prefix once, with gradients. `bf16`: autocast override (default:
    the backbone's setting)."""
    labels = batch["labels"]
    span = labels.shape[1]

    def autocast() -> AbstractContextManager[Any]:
        return backbone.autocast(bf16)

    if "prefix_ids" in batch:
        kv, _ = run_prefix(model, batch["prefix_ids"], autocast)
        hidden = suffix_hidden(model, kv, batch, autocast)
    else:
        hidden = last_hidden_state(model, batch, autocast)
    # every row ends at the last position in both layouts: the same strided slice into the head
    # (a retrain is then bit for bit the same on 1 or 2 threads, as with full rows; tested)
    hidden = hidden[:, -span - 1 : -1]
    head = unwrap_causal_lm(model).get_output_embeddings()
    logits = head(hidden.float())
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )


# -- training one adapter -----------------------------------------------------------------------


@dataclass(frozen=True)
class EpochRecord:
    """One training epoch of an adapter."""

    epoch: int
    steps: int
    """Optimizer steps in this epoch."""
    loss: float
    """Mean training loss (Eq. 4) over the epoch's micro-batches."""
    valid_auc: float | None = None
    """Validation AUC after the epoch (None when not evaluated or undefined: one-class validation)."""

    def __str__(self) -> str:
        auc_text = "not evaluated" if self.valid_auc is None else f"{self.valid_auc:.4f}"
        return f"{self.steps} steps, loss {self.loss:.4f}, valid AUC {auc_text}"


@dataclass
class TrainResult:
    """What training one shard's adapter produced (its state dict is the best epoch's)."""

    adapter_state: dict[str, torch.Tensor]
    adapter_config: dict[str, Any] = field(default_factory=dict)
    """The peft LoraConfig as `adapter_config.json` holds it."""
    metrics: list[EpochRecord] = field(default_factory=list)
    best_epoch: int = 0
    train_seconds: float = 0.0
    samples_per_second: float = 0.0
    """Training throughput (validation scoring excluded); train_seconds includes everything."""


def lora_config(config: TrainConfig, num_layers: int) -> Any:
    from peft import LoraConfig

    layers = None
    if config.top_layers is not None:
        layers = list(range(max(0, num_layers - config.top_layers), num_layers))
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        layers_to_transform=layers,
        bias="none",
        task_type="CAUSAL_LM",
    )


def _num_layers(model: nn.Module) -> int:
    cfg = unwrap_causal_lm(model).config
    return int(getattr(cfg, "num_hidden_layers", 0) or 0)


@contextmanager
def quiet_peft() -> Iterator[None]:
    """peft asks transformers about gradient checkpointing through a deprecated alias on every wrap:
    silence that one warning here, not process-wide."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch for the block and give the process its RNG state back afterwards."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def train_adapter(
    backbone: Backbone,
    train: Sequence[Sample],
    valid: Sequence[Sample],
    config: TrainConfig,
    progress: bool = False,
    desc: str = "train",
) -> TrainResult:
    """Train one fresh LoRA adapter on `train` (seeded init, order and dropout), early stopping on
    validation AUC. Trains its own peft model over a structural copy of the frozen base model:
    `backbone` and anything serving from it are left exactly as they were, and so is the global
    torch RNG."""
    from peft import get_peft_model

    if not train:
        raise ValueError("cannot train an adapter on an empty shard")
    # a canonical order: the adapter depends on the set of samples and the seed, not on list order
    train = sorted(train, key=lambda s: s.sample_id)
    valid = sorted(valid, key=lambda s: s.sample_id)
    valid_pool = list(valid)
    if config.valid_eval_size is not None and len(valid_pool) > config.valid_eval_size:
        rng = np.random.default_rng(config.seed)
        valid_pool = [
            valid_pool[i] for i in sorted(rng.choice(len(valid_pool), config.valid_eval_size, replace=False))
        ]
    result = TrainResult(adapter_state={})
    started = time.perf_counter()
    with seeded(config.seed, backbone.device):
        model = backbone.fork_model()
        peft_config = lora_config(config, _num_layers(model))
        with quiet_peft():
            peft_model = get_peft_model(model, peft_config)
        result.adapter_config = _json_safe(peft_config.to_dict())
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
        generator = torch.Generator().manual_seed(config.seed)
        best_auc = -math.inf
        stale_epochs = 0
        seen = 0
        fit_seconds = 0.0  # optimisation only (validation scoring excluded): for samples/s
        for epoch in range(1, config.epochs + 1):
            peft_model.train()
            order = _epoch_order(train, config, generator)
            losses: list[float] = []
            epoch_started = time.perf_counter()
            steps = range(0, len(order), config.batch_size)
            for start in progress_bar(
                steps, progress, f"{desc} epoch {epoch}/{config.epochs}", unit="step", leave=False
            ):
                step_ids = order[start : start + config.batch_size]
                optimizer.zero_grad(set_to_none=True)
                for micro in range(0, len(step_ids), config.micro_batch_size):
                    chunk = [train[i] for i in step_ids[micro : micro + config.micro_batch_size]]
                    batch = answer_batch(backbone, chunk, config.shared_prefix)
                    loss = answer_loss(backbone, peft_model, batch, config.bf16_autocast)
                    (loss * len(chunk) / len(step_ids)).backward()
                    losses.append(float(loss.detach()))
                optimizer.step()
                seen += len(step_ids)
            fit_seconds += time.perf_counter() - epoch_started
            peft_model.eval()
            valid_auc: float | None = None
            if valid_pool:
                scores = validation_scores(backbone, peft_model, [s.prompt for s in valid_pool], config)
                valid_auc = auc([s.label for s in valid_pool], scores)
            record = EpochRecord(
                epoch,
                len(steps),
                float(np.mean(losses)),
                None if valid_auc is None or math.isnan(valid_auc) else valid_auc,
            )
            result.metrics.append(record)
            # no validation (or one-class validation): keep the latest epoch
            current = record.valid_auc if record.valid_auc is not None else float(epoch)
            if current > best_auc:
                best_auc, result.best_epoch, stale_epochs = current, epoch, 0
                result.adapter_state = _lora_state(peft_model)
            else:
                stale_epochs += 1
            if record.valid_auc is None:
                log.info(
                    "%s epoch %d: %s; no validation AUC, so the latest epoch is kept", desc, epoch, record
                )
            else:
                log.info(
                    "%s epoch %d: %s; best epoch %d, %d of patience %d without improvement",
                    desc,
                    epoch,
                    record,
                    result.best_epoch,
                    stale_epochs,
                    config.patience,
                )
            if stale_epochs >= config.patience:  # patience >= 1: an improving epoch never stops
                break
        result.samples_per_second = seen / max(fit_seconds, 1e-9)
    result.train_seconds = time.perf_counter() - started
    return result


def validation_scores(
    backbone: Backbone, model: nn.Module, prompts: Sequence[str], config: TrainConfig
) -> np.ndarray:
    """P(Yes) of the validation prompts under the adapter being trained (early stopping)."""
    if config.shared_prefix:
        return score_shared_prefix(backbone, model, prompts, bf16=config.bf16_autocast)[0]
    return backbone.score(prompts, model=model, bf16=config.bf16_autocast)


def _json_safe(value: Any) -> Any:
    """A peft config dict as JSON holds it (sets become sorted lists, enums their values)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, set | frozenset):
        return sorted(_json_safe(v) for v in value)
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, enum.Enum):  # PeftType, TaskType
        return value.value
    return value


def _epoch_order(train: Sequence[Sample], config: TrainConfig, generator: torch.Generator) -> list[int]:
    """A seeded random order; with `group_by_length`, random batches of length-sorted neighbours."""
    order = torch.randperm(len(train), generator=generator).tolist()
    if not config.group_by_length:
        return order
    by_length = sorted(order, key=lambda i: len(train[i].prompt))
    batches = [by_length[i : i + config.batch_size] for i in range(0, len(by_length), config.batch_size)]
    return [i for b in torch.randperm(len(batches), generator=generator).tolist() for i in batches[b]]


def _lora_state(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(peft_model).items()}


__all__ = [
    "EpochRecord",
    "Preset",
    "TrainConfig",
    "TrainResult",
    "answer_batch",
    "answer_loss",
    "lora_config",
    "quiet_peft",
    "seeded",
    "train_adapter",
]
