"""Per-request mixtures of K LoRA adapters inside peft's LoRA layers (paper §3.3, Eq. 5-6).

Each row b of a batch carries its own weights ω_b (K,). For a LoRA-targeted Linear with adapters
(A_k: r x in, B_k: out x r, scaling s_k = lora_alpha / r) the layer computes W_0 x plus

* `non_decomposition` (Eq. 6): Δ = Σ_k ω_bk s_k B_k A_k x
  = B_cat · diag((ω_b ∘ s) ⊗ 1_r) · A_cat · x, with A_cat = [A_0; ...] (K·r x in), B_cat = [B_0 ... ] (out x K·r);
* `decomposition` (Eq. 5): Δ = B̄_b Ā_b x with Ā_b = Σ_k ω_bk A_k and B̄_b = Σ_k ω_bk s_k B_k. The scaling
  goes into B̄; for adapters with one common s (same r and alpha, as `apa train` writes) this is
  exactly s·(Σ_k ω_bk B_k)(Σ_k ω_bk A_k) x. It is computed as B_cat · [ω_bk s_k Ā_b x]_k with
  Ā_b x = Σ_k ω_bk (A_k x): the same two GEMMs as ND, no per-row matrix;
* `prediction` (SISA): Σ_k ω_bk P_k(Yes), one forward pass per adapter.

No merge per request: A_cat / B_cat are stacked once per layer (re-stacked automatically when an
adapter's tensors are replaced or modified in place) and the per-row mixture is two GEMMs shared by
every row of the batch.
Adapters whose weight is 0 in every row of the batch are left out of the computation entirely.
LoRA dropout is not applied (inference only).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file

from apa.aggregation.weights import AllShardsExcludedError
from apa.backbone import base_only, progress_bar

Level = Literal["decomposition", "non_decomposition", "prediction"]
LEVELS: tuple[str, ...] = ("decomposition", "non_decomposition", "prediction")
ScoreFn = Callable[[list[str]], np.ndarray]


@dataclass(frozen=True)
class _Stack:
    """The K adapters of one layer, stacked; `key` identifies the tensors they were built from."""

    key: tuple[Any, ...]
    a: torch.Tensor
    """(K, r, in): A_k."""
    b: torch.Tensor
    """(out, K, r): B_k."""
    scaling: torch.Tensor
    """(K,) float32: s_k."""


@dataclass(frozen=True)
class _Mix:
    """The mixture in force during `MixtureLoRA.apply`."""

    weights: torch.Tensor
    """(batch, K_used) float32 ω of the adapters that carry weight in some row."""
    used: torch.Tensor
    """(K_used,) long: indices of those adapters; the others are never touched."""
    level: str


def lora_layers(peft_model: PeftModel, adapter_names: Sequence[str]) -> dict[str, LoraLinear]:
    """Every peft LoRA Linear holding the adapters, by module name; checks they can be mixed."""
    if not adapter_names:
        raise ValueError("need at least one adapter")
    missing = [n for n in adapter_names if n not in peft_model.peft_config]
    if missing:
        raise ValueError(f"adapters not loaded in the peft model: {missing}")
    for n in adapter_names:
        cfg = peft_model.peft_config[n]
        if getattr(cfg, "bias", "none") != "none" or getattr(cfg, "lora_bias", False):
            raise ValueError(f"adapter {n!r} trains biases; the mixture supports plain LoRA only")
    layers: dict[str, LoraLinear] = {}
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        present = [n for n in adapter_names if n in module.lora_A]
        if not present:
            continue
        if len(present) != len(adapter_names):
            raise ValueError(f"{name} holds only {present}: all adapters must target the same modules")
        if not isinstance(module, LoraLinear) or getattr(module, "fan_in_fan_out", False):
            raise ValueError(f"{name}: only LoRA on nn.Linear (fan_in_fan_out=False) can be mixed")
        if any(n in module.lora_variant for n in adapter_names):
            raise ValueError(f"{name}: LoRA variants (DoRA, ...) cannot be mixed")
        ranks = {module.r[n] for n in adapter_names}
        if len(ranks) != 1:
            raise ValueError(f"{name}: adapters have different ranks {sorted(ranks)}")
        layers[name] = module
    if not layers:
        raise ValueError(f"no LoRA Linear layer holds the adapters {list(adapter_names)}")
    return layers


def _tensor_key(t: torch.Tensor) -> tuple[int, int, int]:
    # a replaced tensor changes id/data_ptr; an in-place update (load_state_dict, copy_) bumps _version
    try:
        version = t._version
    except RuntimeError:  # inference tensors keep no version counter: call `invalidate()` after edits
        version = -1
    return (id(t), t.data_ptr(), version)


def _lora_weights(layer: LoraLinear, part: str, adapter_names: Sequence[str]) -> list[torch.Tensor]:
    """The `lora_A` or `lora_B` weight tensors of the adapters, in order."""
    modules: torch.nn.ModuleDict = getattr(layer, part)
    weights: list[torch.Tensor] = []
    for n in adapter_names:
        w = modules[n].weight
        assert isinstance(w, torch.Tensor)
        weights.append(w)
    return weights


def _layer_key(layer: LoraLinear, adapter_names: Sequence[str]) -> tuple[Any, ...]:
    tensors = _lora_weights(layer, "lora_A", adapter_names) + _lora_weights(layer, "lora_B", adapter_names)
    return (tuple(_tensor_key(t) for t in tensors), tuple(float(layer.scaling[n]) for n in adapter_names))


def _stack_layer(layer: LoraLinear, adapter_names: Sequence[str]) -> _Stack:
    with torch.no_grad():
        a = torch.stack([w.detach() for w in _lora_weights(layer, "lora_A", adapter_names)])  # (K, r, in)
        b = torch.stack([w.detach() for w in _lora_weights(layer, "lora_B", adapter_names)], dim=1)
    scales = [float(layer.scaling[n]) for n in adapter_names]
    return _Stack(
        _layer_key(layer, adapter_names), a, b, torch.tensor(scales, dtype=torch.float32, device=a.device)
    )


@contextmanager
def _keep_requires_grad(model: torch.nn.Module) -> Iterator[None]:
    """peft's adapter switching marks adapters trainable; put every flag back afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class MixtureLoRA:
    """Batched per-request mixtures of the K adapters `adapter_names` of a peft LoRA model.

    >>> mix = MixtureLoRA(peft_model, ["shard_0", "shard_1", "shard_2"])
    >>> with mix.apply(weights, level="decomposition"):  # weights: (batch, K), one row per sequence
    ...     logits = peft_model(input_ids=ids, attention_mask=mask).logits

    Row i of `weights` mixes batch row i (broadcast over its tokens): a caller that reorders or splits
    the batch inside the block must reorder ω the same way (`score` handles `Backbone.score`'s
    length sort). `apply` is exclusive (a lock): concurrent threads take turns, a nested one raises.
    """

    def __init__(self, peft_model: PeftModel, adapter_names: Sequence[str]) -> None:
        self.peft_model = peft_model
        self.adapter_names: tuple[str, ...] = tuple(adapter_names)
        self.layers = lora_layers(peft_model, self.adapter_names)
        self._stacks: dict[str, _Stack] = {}
        self._mix: _Mix | None = None
        self._lock = threading.RLock()

    @property
    def num_adapters(self) -> int:
        """K."""
        return len(self.adapter_names)

    def invalidate(self) -> None:
        """Drop the stacked A/B (they are also rebuilt automatically when an adapter's tensors change)."""
        self._stacks.clear()

    def _stack(self, name: str, layer: LoraLinear) -> _Stack:
        cached = self._stacks.get(name)
        if cached is None or cached.key != _layer_key(layer, self.adapter_names):
            cached = self._stacks[name] = _stack_layer(layer, self.adapter_names)
        return cached

    def _as_weights(self, weights: torch.Tensor | np.ndarray) -> torch.Tensor:
        w = torch.as_tensor(np.asarray(weights) if not torch.is_tensor(weights) else weights)
        w = w.detach().to("cpu", torch.float32)
        if w.dim() != 2 or w.shape[1] != self.num_adapters:
            raise ValueError(f"weights must be (batch, {self.num_adapters}), got {tuple(w.shape)}")
        if not torch.isfinite(w).all():
            raise ValueError("weights contain NaN/inf")
        return w

    @contextmanager
    def apply(self, weights: torch.Tensor | np.ndarray, level: Level = "decomposition") -> Iterator[None]:
        """During the block, a forward of the peft model computes base(x) + the per-row mixture delta."""
        if level not in ("decomposition", "non_decomposition"):
            raise ValueError(f"apply supports decomposition / non_decomposition, got {level!r}")
        w = self._as_weights(weights)
        used = torch.nonzero(w.ne(0).any(dim=0)).flatten()
        if len(used) == 0:
            raise AllShardsExcludedError("every adapter has weight 0 in every row")
        device = _lora_weights(next(iter(self.layers.values())), "lora_A", self.adapter_names[:1])[0].device
        with self._lock:
            if self._mix is not None:
                raise RuntimeError("MixtureLoRA.apply is already active (nested apply)")
            self._mix = _Mix(w[:, used].to(device), used.to(device), level)
            handles = [
                layer.register_forward_hook(self._make_hook(name), with_kwargs=True)
                for name, layer in self.layers.items()
            ]
            try:
                with base_only(self.peft_model):
                    yield  # adapters disabled: each LoRA layer returns base(x); the hook adds the mixture
            finally:
                for h in handles:
                    h.remove()
                self._mix = None

    def _make_hook(self, name: str) -> Callable[..., torch.Tensor]:
        def hook(
            module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: torch.Tensor
        ) -> torch.Tensor:
            mix = self._mix
            assert mix is not None and isinstance(module, LoraLinear)
            x = args[0] if args else kwargs["x"]
            return output + mixture_delta(x, self._stack(name, module), mix).to(output.dtype)

        return hook

    @contextmanager
    def only(self, adapter_name: str) -> Iterator[None]:
        """Activate one adapter alone for the block (the previous active set comes back afterwards)."""
        previous, previous_attr = list(self.peft_model.active_adapters), self.peft_model.active_adapter
        with _keep_requires_grad(self.peft_model):
            self.peft_model.set_adapter(adapter_name, inference_mode=True)  # type: ignore[operator]
            try:
                yield
            finally:
                self.peft_model.base_model.set_adapter(previous, inference_mode=True)  # type: ignore[operator]
                self.peft_model.active_adapter = previous_attr

    def predict(
        self,
        score_fn: ScoreFn,
        prompts: Sequence[str],
        weights: torch.Tensor | np.ndarray | None = None,
        *,
        progress: bool = False,
    ) -> np.ndarray:
        """`prediction` level: Σ_k ω_bk P_k(Yes), one `score_fn` call per adapter with weight > 0.

        `weights=None` is SISA's plain average of the K adapters; `progress` shows a bar over them.
        """
        n = len(prompts)
        w = (
            torch.full((n, self.num_adapters), 1.0 / self.num_adapters)
            if weights is None
            else self._as_weights(weights)
        )
        if w.shape[0] != n:
            raise ValueError(f"{w.shape[0]} weight rows for {n} prompts")
        wn = w.double().numpy()
        used = [k for k in range(self.num_adapters) if (wn[:, k] != 0).any()]
        if not used:
            raise AllShardsExcludedError("every adapter has weight 0 in every row")
        total = np.zeros(n, dtype=np.float64)
        for k in progress_bar(used, progress, "serve prediction (adapters)"):
            with self.only(self.adapter_names[k]):
                p = np.asarray(score_fn(list(prompts)), dtype=np.float64).reshape(-1)
            total += wn[:, k] * p
        return total

    def score(
        self,
        score_fn: ScoreFn,
        prompts: Sequence[str],
        weights: torch.Tensor | np.ndarray,
        level: Level = "decomposition",
        *,
        batch_size: int = 16,
        progress: bool = False,
    ) -> np.ndarray:
        """P(Yes) under the mixture at `level`, `batch_size` prompts per `score_fn` call (in input order);
        `progress` shows a bar over the batches (over the adapters' passes at `prediction`).

        ω rows are matched to batch rows by position, so each `score_fn` call must run its prompts as
        ONE forward batch, either in the given order or stably sorted by `len(prompt)` (what
        `Backbone.score` does): chunks are pre-sorted by length so that such a sort is the identity.
        A `score_fn` that splits a chunk is caught (batch size mismatch -> ValueError).
        """
        if level == "prediction":
            return self.predict(score_fn, prompts, weights, progress=progress)
        w = self._as_weights(weights)
        if w.shape[0] != len(prompts):
            raise ValueError(f"{w.shape[0]} weight rows for {len(prompts)} prompts")
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # stable
        out = np.zeros(len(prompts), dtype=np.float64)
        for start in progress_bar(range(0, len(order), batch_size), progress, f"serve {level}"):
            idx = order[start : start + batch_size]
            with self.apply(w[idx], level):
                out[idx] = np.asarray(score_fn([prompts[i] for i in idx]), dtype=np.float64).reshape(-1)
        return out


def mixture_delta(x: torch.Tensor, stack: _Stack, mix: _Mix) -> torch.Tensor:
    """The per-row mixture delta of one layer for input x (batch, ..., in) -> (batch, ..., out).

    Both levels are two GEMMs shared by every row, with A_cat (K'·r x in) and B_cat (out x K'·r),
    and cheap per-row scalings between them (no per-row matrix is ever built):

    * ND: h = A_cat x, then B_cat · ((ω_b ∘ s) ⊗ 1_r ∘ h);
    * D:  u = Σ_k ω_bk h_k = Ā_b x (r wide), then B_cat · [ω_b1 s_1 u; ...; ω_bK' s_K' u] = B̄_b Ā_b x.
    """
    batch = x.shape[0]
    if batch != mix.weights.shape[0]:
        raise ValueError(
            f"batch has {batch} rows but the mixture has {mix.weights.shape[0]} weight rows; "
            "score each apply() block as exactly one batch"
        )
    a = stack.a.index_select(0, mix.used)  # (K', r, in)
    b = stack.b.index_select(1, mix.used)  # (out, K', r)
    w = mix.weights  # (batch, K')
    ws = w * stack.scaling.index_select(0, mix.used)  # ω_k s_k
    k_used, r, d_in = a.shape
    x3 = x.reshape(batch, -1, d_in)  # (batch, L, in)
    if not torch.is_autocast_enabled(x.device.type):  # under autocast the GEMMs pick the dtype
        x3 = x3.to(a.dtype)
    h = F.linear(x3, a.reshape(k_used * r, d_in))  # A_cat x: (batch, L, K'·r)
    if mix.level == "non_decomposition":
        v = h * ws.repeat_interleave(r, dim=1).unsqueeze(1).to(h.dtype)  # diag((ω∘s) ⊗ 1_r)
    else:  # decomposition: u = Σ_k ω_k (A_k x), then every B_k sees ω_k s_k u
        u = torch.einsum("blkr,bk->blr", h.view(batch, -1, k_used, r), w.to(h.dtype))
        v = (u.unsqueeze(2) * ws.to(h.dtype)[:, None, :, None]).reshape(batch, -1, k_used * r)
    y = F.linear(v, b.reshape(-1, k_used * r))  # B_cat ·
    return y.reshape(*x.shape[:-1], y.shape[-1])


def export_merged_adapter(
    peft_model: PeftModel,
    adapter_names: Sequence[str],
    weights: Sequence[float] | np.ndarray | torch.Tensor,
    level: Level,
    out_dir: Path | str,
) -> Path:
    """Write one static peft adapter (adapter_config.json + adapter_model.safetensors) for a fixed ω.

    `non_decomposition`: rank K'·r, A = [ω_k s_k A_k], B = [B_k] (concatenation, exact);
    `decomposition`: rank r, A = Σ ω_k A_k, B = Σ ω_k s_k B_k. ω and s are folded into A/B, so the
    file has lora_alpha = its rank (scaling 1, no rsLoRA).
    Adapters with ω_k = 0 (stale shards) are left out of the file altogether (K' = #nonzero).
    """
    if level not in ("decomposition", "non_decomposition"):
        raise ValueError(f"only decomposition / non_decomposition can be exported, got {level!r}")
    names = tuple(adapter_names)
    w = np.asarray(weights.detach().cpu() if torch.is_tensor(weights) else weights, dtype=np.float64)
    if w.shape != (len(names),) or not np.isfinite(w).all():
        raise ValueError(f"weights must be {len(names)} finite numbers, got shape {w.shape}")
    keep = [k for k in range(len(names)) if w[k] != 0]
    if not keep:
        raise AllShardsExcludedError("every adapter has weight 0; nothing to export")
    layers = lora_layers(peft_model, names)
    mix = _Mix(torch.tensor(w[keep], dtype=torch.float32)[None], torch.tensor(keep), level)
    tensors: dict[str, torch.Tensor] = {}
    rank = 0
    for name, layer in layers.items():
        stack = _stack_layer(layer, names)
        a = stack.a[mix.used].float()  # (K', r, in)
        b = stack.b[:, mix.used].float()  # (out, K', r)
        wk = mix.weights[0].to(a.device)
        ws = wk * stack.scaling[mix.used]
        if level == "non_decomposition":
            new_a = (a * ws[:, None, None]).reshape(-1, a.shape[-1])
            new_b = b.reshape(b.shape[0], -1)
        else:
            new_a = torch.einsum("k,kri->ri", wk, a)
            new_b = torch.einsum("k,okr->or", ws, b)
        dtype = stack.a.dtype
        tensors[f"{name}.lora_A.weight"] = new_a.to(dtype).contiguous().cpu()
        tensors[f"{name}.lora_B.weight"] = new_b.to(dtype).contiguous().cpu()
        rank = new_a.shape[0]
    base_config = peft_model.peft_config[names[0]]
    assert isinstance(base_config, LoraConfig)
    config = dataclasses.replace(
        base_config,
        r=rank,
        lora_alpha=rank,  # scaling 1: ω and s are already inside A/B
        use_rslora=False,
        rank_pattern={},
        alpha_pattern={},
        lora_dropout=0.0,
        inference_mode=True,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(out))
    return out
