"""Adapter artifacts: references, verified loading, and the content-addressed artifact store.

An adapter is three files in peft's format plus our manifest: `adapter_model.safetensors` (the
LoRA weights), `adapter_config.json` and `manifest.json`. Whatever serves an adapter names it by
an `AdapterRef` (shard, version, sha256 of the weights, location) and loads it through an
`AdapterSource`, which hashes the bytes it read and parses *those same bytes*: an adapter whose
file changed on disk is refused, never served.

`ArtifactStore` (setting `APA_ARTIFACT_STORE`, a directory; a shared volume in production) keeps
every registered version at `<root>/<model_id>/<k>/v<version>-<sha256>/`. Entries are written to a
temporary directory and renamed into place, never overwritten and never reused under another
content; a version's location names both its version and its content.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from apa.ids import check_id

if TYPE_CHECKING:
    import torch

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
MANIFEST = "manifest.json"
_CHUNK = 1 << 20


def file_sha256(path: Path | str) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ArtifactError(RuntimeError):
    """An adapter artifact is missing, corrupt, or does not match its sha256."""


@dataclass(frozen=True)
class AdapterRef:
    """One adapter version as a server names it: what to load and the sha256 it must have."""

    shard: int
    """k: the shard index within its model."""
    version: int
    """The manifest's version (1, +1 per retrain)."""
    sha256: str
    """sha256 of `adapter_model.safetensors`; loading refuses any other bytes."""
    location: str
    """Where the source finds it: an artifact-store key or a directory path."""


@dataclass(frozen=True)
class LoadedAdapter:
    """An adapter read and verified: its LoRA config and weights (peft state-dict keys)."""

    ref: AdapterRef
    config: dict[str, Any]
    weights: dict[str, torch.Tensor]

    def lora_config(self) -> Any:
        """The peft `LoraConfig` it was trained with."""
        from peft import LoraConfig

        known = set(LoraConfig.__dataclass_fields__)
        return LoraConfig(**{k: v for k, v in self.config.items() if k in known and k != "peft_type"})


class AdapterSource(Protocol):
    """Loads adapters by reference, verifying their sha256 (model directories, the artifact store)."""

    def load_adapter(self, ref: AdapterRef) -> LoadedAdapter: ...


def load_adapter_dir(directory: Path, ref: AdapterRef) -> LoadedAdapter:
    """Read an adapter directory, verify the weights' sha256 against `ref`, parse those bytes."""
    from safetensors.torch import load as load_safetensors

    try:
        data = (directory / ADAPTER_WEIGHTS).read_bytes()
        config = json.loads((directory / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ArtifactError(
            f"adapter of shard {ref.shard} v{ref.version}: {exc.filename} is missing"
        ) from None
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{directory / ADAPTER_CONFIG}: not valid JSON ({exc})") from None
    actual = bytes_sha256(data)
    if actual != ref.sha256:
        raise ArtifactError(
            f"adapter of shard {ref.shard} v{ref.version} at {directory}: sha256 {actual} does not match "
            f"the expected {ref.sha256}; refusing to load it"
        )
    if not isinstance(config, dict):
        raise ArtifactError(f"{directory / ADAPTER_CONFIG}: expected a JSON object")
    return LoadedAdapter(ref, config, load_safetensors(data))


def write_adapter_files(
    directory: Path,
    weights: dict[str, torch.Tensor],
    config: dict[str, Any],
    manifest: dict[str, Any] | None = None,
) -> str:
    """Write an adapter's weights and config (and `manifest`, with the weights' sha256 filled in,
    when given) into `directory` (created); returns the weights' sha256."""
    from safetensors.torch import save as save_safetensors

    directory.mkdir(parents=True, exist_ok=True)
    data = save_safetensors({k: v.contiguous() for k, v in weights.items()})
    _write_synced(directory / ADAPTER_WEIGHTS, data)
    _write_synced(directory / ADAPTER_CONFIG, json.dumps(config, indent=2, sort_keys=True).encode())
    sha = bytes_sha256(data)
    if manifest is None:
        return sha
    if manifest.get("adapter_sha256") not in (None, sha):
        raise ArtifactError(
            f"manifest says adapter_sha256 {manifest['adapter_sha256']}, the weights hash to {sha}"
        )
    _write_synced(directory / MANIFEST, json.dumps({**manifest, "adapter_sha256": sha}, indent=2).encode())
    return sha


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


class ArtifactStore:
    """A directory of adapter versions, each at `<model_id>/<k>/v<version>-<sha256>/` (its key)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @staticmethod
    def key(model_id: str, shard: int, version: int, sha256: str) -> str:
        check_id(model_id, "model_id")
        return f"{model_id}/{int(shard)}/v{int(version)}-{sha256}"

    def path(self, key: str) -> Path:
        parts = key.split("/")
        if len(parts) != 3 or any(p in ("", ".", "..") for p in parts):
            raise ArtifactError(f"not an artifact key: {key!r}")
        return self.root.joinpath(*parts)

    def put(
        self, model_id: str, shard: int, version: int, adapter_dir: Path, manifest: Mapping[str, Any]
    ) -> str:
        """Copy an adapter (weights and config from `adapter_dir`, and its manifest) into the store;
        returns its key. Idempotent for the same content; an existing entry is never overwritten."""
        sha = file_sha256(adapter_dir / ADAPTER_WEIGHTS)
        if manifest.get("adapter_sha256") != sha:
            raise ArtifactError(
                f"{adapter_dir / ADAPTER_WEIGHTS} has sha256 {sha}, its manifest says {manifest.get('adapter_sha256')}"
            )
        key = self.key(model_id, shard, version, sha)
        target = self.path(key)
        if target.exists():
            self._check_entry(target, sha)
            return key
        tmp = self.root / ".tmp" / uuid.uuid4().hex
        tmp.mkdir(parents=True)
        try:
            _write_synced(tmp / ADAPTER_WEIGHTS, (adapter_dir / ADAPTER_WEIGHTS).read_bytes())
            _write_synced(tmp / ADAPTER_CONFIG, (adapter_dir / ADAPTER_CONFIG).read_bytes())
            _write_synced(tmp / MANIFEST, json.dumps(dict(manifest), indent=2, sort_keys=True).encode())
            if file_sha256(tmp / ADAPTER_WEIGHTS) != sha:
                raise ArtifactError(f"{adapter_dir / ADAPTER_WEIGHTS} changed while it was copied")
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(tmp, target)  # atomic; fails if the target exists (never overwritten)
            except OSError:
                if not target.exists():
                    raise
                self._check_entry(target, sha)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return key

    def put_trained(
        self,
        model_id: str,
        shard: int,
        version: int,
        weights: Mapping[str, torch.Tensor],
        config: Mapping[str, Any],
        manifest: Mapping[str, Any],
    ) -> tuple[str, str]:
        """Store a freshly trained adapter from memory; returns (key, weights sha256). The manifest
        is stored with `adapter_sha256` set to the weights' sha256."""
        tmp = self.root / ".tmp" / uuid.uuid4().hex
        try:
            sha = write_adapter_files(tmp, dict(weights), dict(config))
            return self.put(model_id, shard, version, tmp, {**manifest, "adapter_sha256": sha}), sha
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _check_entry(self, target: Path, sha: str) -> None:
        actual = file_sha256(target / ADAPTER_WEIGHTS)
        if actual != sha:
            raise ArtifactError(
                f"artifact {target} exists with other content (sha256 {actual}); not overwriting it"
            )

    def load_adapter(self, ref: AdapterRef) -> LoadedAdapter:
        return load_adapter_dir(self.path(ref.location), ref)

    def manifest(self, key: str) -> dict[str, Any]:
        try:
            data = json.loads((self.path(key) / MANIFEST).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ArtifactError(f"artifact {key}: manifest missing") from None
        if not isinstance(data, dict):
            raise ArtifactError(f"artifact {key}: manifest is not a JSON object")
        return data

    def exists(self, key: str) -> bool:
        return (self.path(key) / ADAPTER_WEIGHTS).is_file()

    def delete(self, key: str) -> bool:
        """Delete an entry (weights trained on erased data). False if it was already gone; any other
        failure raises: a delete that did not happen must not pass for one that did."""
        target = self.path(key)
        if not target.exists():
            return False
        trash = self.root / ".tmp" / f"deleting-{uuid.uuid4().hex}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        os.rename(target, trash)  # the entry disappears atomically, then its bytes go
        shutil.rmtree(trash)
        return True

    def keys(self) -> list[str]:
        """Every stored entry's key."""
        if not self.root.is_dir():
            return []
        return sorted(
            "/".join(p.relative_to(self.root).parts)
            for p in self.root.glob("*/*/v*")
            if p.is_dir() and p.parts[-3] != ".tmp"
        )


__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "MANIFEST",
    "AdapterRef",
    "AdapterSource",
    "ArtifactError",
    "ArtifactStore",
    "LoadedAdapter",
    "bytes_sha256",
    "file_sha256",
    "load_adapter_dir",
    "write_adapter_files",
]
