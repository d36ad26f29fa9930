"""One LoRA adapter per shard (TALLRec, Eq. 4), model directories with manifests, and unlearning.

A model directory (layout in docs/LAYOUT.md) holds the samples it was built from, the partition,
and for each shard an adapter in peft's format beside a manifest naming every sample it was
trained on. `unlearn` retrains, from scratch and with the same seed, exactly the shards whose
manifests hold an erased sample; "Retraining" (one adapter on everything) is K=1.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from apa.backbone import (
    Backbone,
    BackboneConfig,
    file_sha256,
    last_hidden_state,
    unwrap_causal_lm,
    with_positions,
)
from apa.data import Sample, load_splits, write_jsonl
from apa.data.samples import sample_digest
from apa.metrics import auc
from apa.partition import Partition, PartitionConfig, partition

log = logging.getLogger(__name__)
# peft asks transformers about gradient checkpointing through a deprecated alias on every wrap
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

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
    bf16_autocast: bool = True
    """Train under bf16 autocast on CPU (loss and Yes/No logits in fp32)."""
    top_layers: int | None = None
    """LoRA only on the top N transformer layers (None: all layers); a speed/quality trade-off."""
    group_by_length: bool = False
    """Form each step's batch from samples of similar length (less padding); batch order stays random."""

    def __post_init__(self) -> None:
        for name in ("lora_r", "lora_alpha", "epochs", "batch_size", "micro_batch_size"):
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
        if "target_modules" in kwargs:
            kwargs["target_modules"] = tuple(kwargs["target_modules"])
        return cls(**kwargs)


# -- the loss on the answer tokens -------------------------------------------------------------


def answer_batch(backbone: Backbone, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
    """Left-padded prompt+answer+EOS ids, with `labels` (-100 except the answer tokens) aligned to
    the last `labels.shape[1]` positions. Every row ends at the last position (left padding), so
    the answer sits at the end of every row and logits are needed only there."""
    tok = backbone.tokenizer
    rows: list[list[int]] = []
    answers: list[list[int]] = []
    for sample in samples:
        prompt_ids = tok(sample.prompt, add_special_tokens=True)["input_ids"]
        answer_ids = tok(sample.output, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        keep = backbone.config.max_length - len(answer_ids)
        rows.append(list(prompt_ids[-keep:]) + answer_ids)
        answers.append(answer_ids)
    width = max(len(r) for r in rows)
    span = max(len(a) for a in answers)
    input_ids = torch.full((len(rows), width), int(tok.pad_token_id), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), span), -100, dtype=torch.long)
    for i, (row, ans) in enumerate(zip(rows, answers, strict=True)):
        input_ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
        labels[i, span - len(ans) :] = torch.tensor(ans)
    return backbone.to_device(
        with_positions({"input_ids": input_ids, "attention_mask": mask, "labels": labels})
    )


def answer_loss(backbone: Backbone, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Eq. 4: mean negative log-likelihood of the answer tokens. The LM head runs only on the
    positions that predict answer tokens (full-vocabulary logits everywhere cost 1.6x a step)."""
    labels = batch["labels"]
    span = labels.shape[1]
    hidden = last_hidden_state(model, batch, backbone.autocast)[:, -span - 1 : -1]
    head = unwrap_causal_lm(model).get_output_embeddings()
    logits = head(hidden.float())
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )


# -- training one adapter -----------------------------------------------------------------------


@dataclass
class TrainResult:
    """What training one shard's adapter produced (its state dict is the best epoch's)."""

    adapter_state: dict[str, torch.Tensor]
    metrics: list[dict[str, float]] = field(default_factory=list)
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


def train_adapter(
    backbone: Backbone,
    train: Sequence[Sample],
    valid: Sequence[Sample],
    config: TrainConfig,
    progress: bool = False,
    desc: str = "train",
) -> TrainResult:
    """Train one fresh LoRA adapter on `train` (seeded init, order and dropout), early stopping on
    validation AUC; the base model is left exactly as it was (the adapter is unloaded)."""
    from peft import get_peft_model

    if not train:
        raise ValueError("cannot train an adapter on an empty shard")
    # a canonical order: the adapter depends on the set of samples and the seed, not on list order
    train = sorted(train, key=lambda s: s.sample_id)
    valid = sorted(valid, key=lambda s: s.sample_id)
    torch.manual_seed(config.seed)
    base = backbone.model
    peft_model = get_peft_model(base, lora_config(config, _num_layers(base)))
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    valid_pool = list(valid)
    if config.valid_eval_size is not None and len(valid_pool) > config.valid_eval_size:
        rng = np.random.default_rng(config.seed)
        valid_pool = [
            valid_pool[i] for i in sorted(rng.choice(len(valid_pool), config.valid_eval_size, replace=False))
        ]
    bf16 = backbone.config.bf16_autocast
    backbone.config = replace(backbone.config, bf16_autocast=config.bf16_autocast)
    result = TrainResult(adapter_state={})
    best_auc = -math.inf
    stale_epochs = 0
    seen = 0
    fit_seconds = 0.0  # optimisation only (validation scoring excluded): for samples/s
    started = time.perf_counter()
    try:
        for epoch in range(1, config.epochs + 1):
            peft_model.train()
            order = _epoch_order(train, config, generator)
            losses: list[float] = []
            epoch_started = time.perf_counter()
            steps = range(0, len(order), config.batch_size)
            for start in _bar(steps, progress, f"{desc} epoch {epoch}/{config.epochs}"):
                step_ids = order[start : start + config.batch_size]
                optimizer.zero_grad(set_to_none=True)
                for micro in range(0, len(step_ids), config.micro_batch_size):
                    chunk = [train[i] for i in step_ids[micro : micro + config.micro_batch_size]]
                    loss = answer_loss(backbone, peft_model, answer_batch(backbone, chunk))
                    (loss * len(chunk) / len(step_ids)).backward()
                    losses.append(float(loss.detach()))
                optimizer.step()
                seen += len(step_ids)
            fit_seconds += time.perf_counter() - epoch_started
            peft_model.eval()
            record: dict[str, float] = {"epoch": epoch, "loss": float(np.mean(losses))}
            if valid_pool:
                scores = backbone.score([s.prompt for s in valid_pool], model=peft_model)
                record["valid_auc"] = auc([s.label for s in valid_pool], scores)
            result.metrics.append(record)
            log.info("%s epoch %d: %s", desc, epoch, record)
            current = record.get("valid_auc", float(epoch))
            if math.isnan(current):
                current = float(epoch)  # one-class validation: keep the latest epoch
            if current > best_auc:
                best_auc, result.best_epoch, stale_epochs = current, epoch, 0
                result.adapter_state = _lora_state(peft_model)
            else:
                stale_epochs += 1
                if stale_epochs >= config.patience:
                    break
    finally:
        result.train_seconds = time.perf_counter() - started
        result.samples_per_second = seen / max(fit_seconds, 1e-9)
        backbone.config = replace(backbone.config, bf16_autocast=bf16)
        peft_model.unload()  # removes the LoRA layers, leaving the frozen base model untouched
        backbone.model = base
        base.eval()
    return result


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


def _bar(items: Iterable[Any], enabled: bool, desc: str) -> Iterable[Any]:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="step", leave=False)


# -- model directories ---------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(path)


class ModelDir:
    """Read/write access to a model directory (docs/LAYOUT.md)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def info(self) -> dict[str, Any]:
        return json.loads((self.root / "model.json").read_text())  # type: ignore[no-any-return]

    @property
    def num_shards(self) -> int:
        return int(self.info["num_shards"])

    def splits(self) -> dict[str, list[Sample]]:
        return load_splits(self.root / "data")

    def partition(self) -> Partition:
        return Partition.from_json(json.loads((self.root / "partition.json").read_text()))

    def shard_dir(self, shard: int) -> Path:
        return self.root / "shards" / str(shard)

    def adapter_dir(self, shard: int) -> Path:
        return self.shard_dir(shard) / "adapter"

    def manifest(self, shard: int) -> dict[str, Any]:
        return json.loads((self.shard_dir(shard) / "manifest.json").read_text())  # type: ignore[no-any-return]

    def manifests(self) -> list[dict[str, Any]]:
        return [self.manifest(k) for k in range(self.num_shards)]

    def train_config(self) -> TrainConfig:
        return TrainConfig.from_json(self.info["train_config"])

    def backbone_config(self) -> BackboneConfig:
        return BackboneConfig(**self.info["backbone_config"])

    def save_adapter(
        self,
        backbone: Backbone,
        shard: int,
        sample_ids: Sequence[str],
        config: TrainConfig,
        result: TrainResult,
        version: int,
    ) -> dict[str, Any]:
        """Write the adapter (peft format, safetensors) and its manifest, replacing any previous
        version of this shard: superseded weights are deleted, not archived (they hold erased data)."""
        from peft import get_peft_model, set_peft_model_state_dict

        shard_dir = self.shard_dir(shard)
        tmp = shard_dir.with_name(f"{shard}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "adapter").mkdir(parents=True)
        peft_model = get_peft_model(backbone.model, lora_config(config, _num_layers(backbone.model)))
        try:
            set_peft_model_state_dict(peft_model, result.adapter_state)
            peft_model.save_pretrained(tmp / "adapter", safe_serialization=True)
        finally:
            peft_model.unload()
        manifest = {
            "shard_id": shard,
            "version": version,
            "sample_ids": sorted(sample_ids),
            "sample_digest": sample_digest(sample_ids),
            "num_samples": len(sample_ids),
            "config": config.to_json(),
            "seed": config.seed,
            "base_model": backbone.model_id,
            "base_model_digest": backbone.model_digest,
            "adapter_sha256": file_sha256(tmp / "adapter" / "adapter_model.safetensors"),
            "metrics": result.metrics,
            "best_epoch": result.best_epoch,
            "trained_at": _now(),
            "train_seconds": round(result.train_seconds, 3),
            "samples_per_second": round(result.samples_per_second, 3),
        }
        _write_json(tmp / "manifest.json", manifest)
        shutil.rmtree(shard_dir, ignore_errors=True)
        tmp.rename(shard_dir)
        return manifest

    def load_adapters(self, backbone: Backbone, shards: Sequence[int] | None = None) -> Any:
        """A PeftModel over the backbone with adapters `shard_<k>` loaded (call `.unload()` when done)."""
        from peft import PeftModel

        ids = list(range(self.num_shards)) if shards is None else list(shards)
        if not ids:
            raise ValueError("no shards to load")
        model = PeftModel.from_pretrained(
            backbone.model, str(self.adapter_dir(ids[0])), adapter_name=f"shard_{ids[0]}"
        )
        for k in ids[1:]:
            model.load_adapter(str(self.adapter_dir(k)), adapter_name=f"shard_{k}")
        model.eval()
        return model


# -- building a model: partition + one adapter per shard ---------------------------------------


@dataclass(frozen=True)
class BuildReport:
    """What `build_model` measured."""

    model_dir: str
    shard_seconds: list[float]
    shard_sizes: list[int]
    samples_per_second: list[float]


def build_model(
    backbone: Backbone,
    splits: Mapping[str, list[Sample]],
    out: str | Path,
    partition_config: PartitionConfig,
    train_config: TrainConfig,
    progress: bool = True,
    embeddings: np.ndarray | None = None,
) -> BuildReport:
    """Partition the training split and train one adapter per shard into model directory `out`."""
    out = Path(out)
    train = splits["train"]
    if partition_config.num_shards == 1:  # "Retraining": one shard, nothing to embed or cluster
        partition_config = replace(partition_config, strategy="random")
    if (
        embeddings is None
        and partition_config.strategy in ("semantic", "bekm", "user")
        and partition_config.num_shards > 1
    ):
        embeddings = backbone.embed([s.prompt for s in train], progress=progress)
    parts = partition(
        [s.sample_id for s in train],
        partition_config,
        embeddings=embeddings,
        user_ids=[s.user_id for s in train],
    )
    (out / "data").mkdir(parents=True, exist_ok=True)
    (out / "shards").mkdir(exist_ok=True)
    for name, samples in splits.items():
        write_jsonl(out / "data" / f"{name}.jsonl", samples)
    _write_json(out / "partition.json", parts.to_json())
    _write_json(
        out / "model.json",
        {
            "base_model": backbone.model_id,
            "base_model_digest": backbone.model_digest,
            "backbone_config": asdict(backbone.config),
            "partition_config": asdict(partition_config),
            "train_config": train_config.to_json(),
            "num_shards": len(parts.shards),
            "created_at": _now(),
        },
    )
    model_dir = ModelDir(out)
    by_id = {s.sample_id: s for s in train}
    seconds, sizes, speeds = [], [], []
    for k, ids in enumerate(parts.shards):
        shard_samples = [by_id[i] for i in ids]
        result = train_adapter(
            backbone,
            shard_samples,
            splits.get("valid", []),
            train_config,
            progress,
            f"shard {k}/{len(parts.shards)}",
        )
        model_dir.save_adapter(backbone, k, ids, train_config, result, version=1)
        seconds.append(result.train_seconds)
        sizes.append(len(ids))
        speeds.append(result.samples_per_second)
    return BuildReport(str(out), seconds, sizes, speeds)


# -- unlearning ---------------------------------------------------------------------------------


class UnlearningError(RuntimeError):
    """Unlearning could not prove that no adapter still holds an erased sample."""


@dataclass(frozen=True)
class UnlearnReport:
    """What an `unlearn` call did and what it cost."""

    erased_samples: int
    affected_shards: list[int]
    retrain_seconds: float
    full_retrain_seconds: float
    """Sum of every shard's last training time: the cost of retraining everything."""
    versions: dict[int, int]

    @property
    def speedup(self) -> float:
        return self.full_retrain_seconds / max(self.retrain_seconds, 1e-9)


def erased_sample_ids(
    samples: Iterable[Sample], user_ids: Iterable[str] = (), interaction_ids: Iterable[str] = ()
) -> set[str]:
    """Every sample of the given users, and every sample holding a given interaction (history or target)."""
    users, inter = set(user_ids), set(interaction_ids)
    return {s.sample_id for s in samples if s.user_id in users or inter.intersection(s.interaction_ids)}


def unlearn(
    model_dir: str | Path,
    sample_ids: Iterable[str],
    backbone: Backbone | None = None,
    progress: bool = True,
    on_shard: Callable[[int, dict[str, Any]], None] | None = None,
) -> UnlearnReport:
    """Erase `sample_ids` from every split of `model_dir` and retrain, from scratch with the same
    config and seed, exactly the shards whose manifests contain one of them. Raises
    `UnlearningError` (and leaves the erased ids listed) if any manifest still holds one."""
    md = ModelDir(model_dir)
    erased = set(sample_ids)
    splits = md.splits()
    manifests = md.manifests()
    affected = [m["shard_id"] for m in manifests if erased.intersection(m["sample_ids"])]
    full_seconds = float(sum(m["train_seconds"] for m in manifests))
    # 1. the data: erased samples leave every split and the partition, before any retraining
    remaining = {name: [s for s in samples if s.sample_id not in erased] for name, samples in splits.items()}
    found = sum(len(splits[n]) - len(remaining[n]) for n in splits)
    for name, samples in remaining.items():
        write_jsonl(md.root / "data" / f"{name}.jsonl", samples)
    parts = md.partition()
    parts = Partition(
        shards=[[i for i in shard if i not in erased] for shard in parts.shards],
        centroids=parts.centroids,
        config=parts.config,
    )
    _write_json(md.root / "partition.json", parts.to_json())
    # 2. the adapters: retrain every affected shard from scratch on its remainder
    started = time.perf_counter()
    versions: dict[int, int] = {}
    if affected:
        backbone = backbone or Backbone.load(md.backbone_config())
        by_id = {s.sample_id: s for s in remaining["train"]}
        for k in affected:
            old = manifests[k]
            config = TrainConfig.from_json(old["config"])
            ids = parts.shards[k]
            if ids:
                result = train_adapter(
                    backbone,
                    [by_id[i] for i in ids],
                    remaining.get("valid", []),
                    config,
                    progress,
                    f"retrain shard {k}",
                )
                manifest = md.save_adapter(backbone, k, ids, config, result, version=int(old["version"]) + 1)
            else:  # the shard lost all its samples: no adapter may remain
                shutil.rmtree(md.adapter_dir(k), ignore_errors=True)
                manifest = {
                    **old,
                    "sample_ids": [],
                    "sample_digest": sample_digest([]),
                    "num_samples": 0,
                    "version": int(old["version"]) + 1,
                    "adapter_sha256": None,
                    "trained_at": _now(),
                    "train_seconds": 0.0,
                    "metrics": [],
                }
                _write_json(md.shard_dir(k) / "manifest.json", manifest)
            versions[k] = int(manifest["version"])
            if on_shard:
                on_shard(k, manifest)
    retrain_seconds = time.perf_counter() - started
    # 3. proof: no manifest, adapter or split may still reference an erased sample
    for m in md.manifests():
        leaked = erased.intersection(m["sample_ids"])
        if leaked:
            raise UnlearningError(
                f"shard {m['shard_id']} manifest still holds erased samples {sorted(leaked)[:5]}"
            )
    still = {s.sample_id for samples in md.splits().values() for s in samples} & erased
    if still:
        raise UnlearningError(f"data splits still hold erased samples {sorted(still)[:5]}")
    return UnlearnReport(found, affected, retrain_seconds, full_seconds, versions)


# -- evaluation ------------------------------------------------------------------------------------


def evaluate_model_dir(
    backbone: Backbone,
    model_dir: str | Path,
    split: str = "test",
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """AUC of the zero-shot base model, of each shard adapter, and (K > 1) of averaging their predictions."""
    md = ModelDir(model_dir)
    samples = md.splits()[split][:limit] if limit else md.splits()[split]
    prompts = [s.prompt for s in samples]
    labels = [s.label for s in samples]
    report: dict[str, Any] = {"split": split, "num_samples": len(samples)}
    report["zero_shot_auc"] = auc(labels, backbone.score(prompts, progress=progress))
    shard_ids = [m["shard_id"] for m in md.manifests() if m.get("adapter_sha256")]
    per_shard: dict[int, float] = {}
    predictions = []
    model = md.load_adapters(backbone, shard_ids)
    try:
        for k in shard_ids:
            model.set_adapter(f"shard_{k}")
            scores = backbone.score(prompts, model=model, progress=progress)
            predictions.append(scores)
            per_shard[k] = auc(labels, scores)
    finally:
        model.unload()
        backbone.model.eval()
    report["shard_auc"] = per_shard
    if len(predictions) > 1:
        report["prediction_average_auc"] = auc(labels, np.mean(predictions, axis=0))
    return report


# -- CLI -----------------------------------------------------------------------------------------


def train_command(
    data: str = "data/ml-100k",
    out: str = "runs/model",
    num_shards: int = 1,
    strategy: Literal["semantic", "random", "user", "bekm"] = "semantic",
    preset: Preset = "cpu",
    epochs: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    train_limit: int | None = None,
    test_limit: int | None = None,
    model: str = "embedded",
    bf16: bool = True,
    top_layers: int | None = None,
    group_by_length: bool = False,
    evaluate: bool = True,
) -> int:
    """Partition the training split, train one LoRA adapter per shard, print test AUC.

    Args:
        data: Directory with train/valid/test.jsonl (from `apa prepare`).
        out: Model directory to write (adapters, manifests, partition).
        num_shards: K. 1 is "Retraining" (one adapter on all training data).
        strategy: Partition strategy (semantic is the paper's Algorithm 1).
        preset: `cpu` (lr 5e-4, 3 epochs, batch 8) or `tallrec` (lr 1e-4, 200 epochs, early stopping).
        epochs: Override the preset's maximum epochs.
        lr: Override the preset's learning rate.
        batch_size: Override the preset's batch size.
        seed: Seed for partition, LoRA init, data order and dropout.
        train_limit: Use only the first N training samples.
        test_limit: Evaluate on the first N test samples only.
        model: Backbone: `embedded`, a model directory, a .gguf file or a hub id.
        bf16: bf16 autocast on CPU for training and scoring.
        top_layers: LoRA on the top N layers only (faster, lower quality).
        group_by_length: Batch samples of similar length together (less padding).
        evaluate: Print test AUC when done.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    splits = load_splits(data)
    if train_limit:
        splits["train"] = splits["train"][:train_limit]
    backbone = Backbone.load(BackboneConfig(model=model, bf16_autocast=bf16))
    tconf = TrainConfig.preset(
        preset,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        micro_batch_size=batch_size,
        seed=seed,
        bf16_autocast=bf16,
        top_layers=top_layers,
        group_by_length=group_by_length,
    )
    pconf = PartitionConfig(strategy=strategy, num_shards=num_shards, seed=seed)
    report = build_model(backbone, splits, out, pconf, tconf, progress=True)
    for k, (secs, size, sps) in enumerate(
        zip(report.shard_seconds, report.shard_sizes, report.samples_per_second, strict=True)
    ):
        print(f"shard {k}: {size} samples, {secs:.1f} s, {sps:.2f} samples/s")
    if evaluate:
        _print_eval(evaluate_model_dir(backbone, out, "test", test_limit))
    return 0


def evaluate_command(model_dir: str = "runs/model", split: str = "test", limit: int | None = None) -> int:
    """Print the ROC AUC of a model directory's adapters (and the zero-shot base model) on a split.

    Args:
        model_dir: A directory written by `apa train`.
        split: test or valid.
        limit: Evaluate on the first N samples only.
    """
    md = ModelDir(model_dir)
    backbone = Backbone.load(md.backbone_config())
    _print_eval(evaluate_model_dir(backbone, model_dir, split, limit))
    return 0


def unlearn_command(
    model_dir: str, user_id: list[str] | None = None, interaction_id: list[str] | None = None
) -> int:
    """Erase users or interactions from a model directory and retrain the affected shards.

    Args:
        model_dir: A directory written by `apa train`.
        user_id: Users whose every sample is erased.
        interaction_id: Interactions whose every sample (history or target) is erased.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    md = ModelDir(model_dir)
    all_samples = [s for samples in md.splits().values() for s in samples]
    ids = erased_sample_ids(all_samples, user_id or [], interaction_id or [])
    if not ids:
        print("no sample matches; nothing to unlearn")
        return 1
    report = unlearn(model_dir, ids)
    print(json.dumps({**asdict(report), "speedup_vs_full_retrain": round(report.speedup, 2)}, indent=2))
    return 0


def _print_eval(report: dict[str, Any]) -> None:
    print(f"{report['split']} samples: {report['num_samples']}")
    print(f"zero-shot base model AUC: {report['zero_shot_auc']:.4f}")
    for k, value in report["shard_auc"].items():
        print(f"shard {k} adapter AUC: {value:.4f}")
    if "prediction_average_auc" in report:
        print(f"average of shard predictions AUC: {report['prediction_average_auc']:.4f}")


__all__ = [
    "TrainConfig",
    "TrainResult",
    "ModelDir",
    "BuildReport",
    "UnlearnReport",
    "UnlearningError",
    "answer_batch",
    "answer_loss",
    "train_adapter",
    "build_model",
    "unlearn",
    "erased_sample_ids",
    "evaluate_model_dir",
    "sample_digest",
]
