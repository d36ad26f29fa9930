"""The erasure life cycle against the registry: the one implementation every service calls.

1. `handle_erasure` (in the caller's transaction): record the request, erase the samples, mark
   their shards stale with a new generation and exclude their serving adapters, audit it all.
2. `scrub_model_dirs` (after the commit, and again by `resume`): the registered model
   directories that this machine holds lose the erased samples (splits, partition, caches).
3. `retrain_shard`: one stale shard's adapter is retrained from scratch on what the registry says
   remains, stored in the artifact store, and registered under the promotion rule (it serves only
   if its shard's generation did not move meanwhile). The weights it replaces, trained on erased
   data, are deleted from the store, and the new version is mirrored into the model directory.
4. `serving_refs`: what a replica must serve now, by the registry.

Shards are named by `ShardRef`, not by parsing `"<model>/<k>"` strings.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from apa.artifacts import AdapterRef, ArtifactStore
from apa.db import audit, registry
from apa.db.models import AdapterVersion, AuditLog, Model
from apa.db.models import Sample as SampleRow
from apa.db.session import session_scope
from apa.events import ErasureRequested
from apa.ids import check_id, check_shard_id
from apa.pseudonyms import Pseudonymizer

if TYPE_CHECKING:  # the training side (torch) is imported only by the functions that train
    from apa.backbone import Backbone
    from apa.data import Sample as DataSample
    from apa.modeldir import ShardManifest

log = logging.getLogger(__name__)


@dataclass(frozen=True, order=True)
class ShardRef:
    """Shard k of a registered model; its registry id is `<model_id>/<k>`."""

    model_id: str
    index: int

    def __post_init__(self) -> None:
        check_id(self.model_id, "model_id")
        if isinstance(self.index, bool) or not isinstance(self.index, int) or self.index < 0:
            raise ValueError(f"shard index must be an integer >= 0, got {self.index!r}")

    @property
    def key(self) -> str:
        return registry.shard_key(self.model_id, self.index)

    @classmethod
    def parse(cls, key: str) -> ShardRef:
        """`<model_id>/<k>` as a ShardRef (ValueError naming the problem otherwise)."""
        check_shard_id(key, "shard_id")
        model_id, _, index = key.rpartition("/")
        return cls(model_id, int(index))

    def __str__(self) -> str:
        return self.key


@dataclass(frozen=True)
class ErasureOutcome:
    """What `handle_erasure` did."""

    request_id: str
    created: bool
    """False for a redelivered request (nothing changed)."""
    samples_erased: int
    stale: dict[ShardRef, int]
    """Shards made stale by this request, with their new generation."""
    status: str


def handle_erasure(
    session: Session,
    event: ErasureRequested,
    pseudonymizer: Pseudonymizer,
    *,
    now: datetime | None = None,
) -> ErasureOutcome:
    """Step 1, in the caller's transaction (commit before acknowledging the event)."""
    result = registry.record_erasure(session, event, pseudonymizer, now=now)
    stale = {ShardRef.parse(key): generation for key, generation in result.generations.items()}
    return ErasureOutcome(
        result.request.request_id, result.created, len(result.erased_samples), stale, result.request.status
    )


def scrub_model_dirs(session: Session, pseudonymizer: Pseudonymizer) -> list[str]:
    """Step 2: every registered model directory present on this machine loses its erased samples
    (splits, partition, caches). Idempotent; returns the directories scrubbed."""
    from apa.modeldir import ModelDir
    from apa.sharded import scrub

    done = []
    for model in session.scalars(select(Model).order_by(Model.id)):
        if not model.model_dir or not (Path(model.model_dir) / "model.json").is_file():
            continue
        md = ModelDir(model.model_dir)
        md.check_key(pseudonymizer)
        erased = frozenset(registry.erased_sample_pids(session, model.id))
        if erased:
            scrub(md, erased, pseudonymizer)
            done.append(str(md.root))
    return done


@dataclass(frozen=True)
class RetrainOutcome:
    """What `retrain_shard` did."""

    shard: ShardRef
    manifest: ShardManifest
    artifact_key: str
    """Artifact-store key of the new version ("" for a shard left without samples)."""
    adapter_version_id: int | None
    """The registered version (None when it was discarded: trained on samples erased meanwhile)."""
    promoted: bool
    """False when newer erasures hit the shard meanwhile: retrain again."""
    generation: int
    """The shard generation the training data was taken at."""
    deleted_artifacts: list[str]
    """Store keys whose weights were deleted: the replaced versions', or this one's if discarded."""


def _records(rows: list[SampleRow]) -> list[DataSample]:
    from apa.data import Sample as DataSample

    return [DataSample.from_dict(json.loads(row.text or "null")) for row in rows]


def retrain_shard(
    engine: Engine,
    shard: ShardRef,
    *,
    backbone: Backbone,
    store: ArtifactStore,
    pseudonymizer: Pseudonymizer,
    progress: bool = False,
) -> RetrainOutcome | None:
    """Step 3 for one stale shard. Returns None when the shard is serving (nothing to do)."""
    from apa.modeldir import ModelDir, ModelInfo, ShardManifest
    from apa.sharded import shard_manifest
    from apa.training import train_adapter

    with session_scope(engine) as session:
        try:
            generation = registry.mark_retraining(session, shard.key)
        except registry.ConflictError:
            return None
        model = session.get(Model, shard.model_id)
        if model is None:
            raise registry.NotFoundError(f"model {shard.model_id!r}")
        info = ModelInfo.from_json(model.config, f"model {shard.model_id} config")
        pseudonymizer.check_key_id(info.pseudonym_key_id, f"model {shard.model_id}")
        samples = _records(registry.remaining_samples(session, shard.key))
        valid = _records(registry.live_samples(session, shard.model_id, "valid"))
        latest = session.scalars(
            select(AdapterVersion)
            .where(AdapterVersion.shard_id == shard.key)
            .order_by(AdapterVersion.version.desc())
            .limit(1)
        ).first()
        version = _next_version(session, shard, latest)
        config = ShardManifest.from_json(latest.manifest).train_config if latest else info.train_config
        model_dir = model.model_dir

    result = (
        train_adapter(backbone, samples, valid, config, progress, f"retrain {shard}") if samples else None
    )
    manifest = shard_manifest(shard.index, version, samples, config, backbone, pseudonymizer, result)
    key = ""
    if result is not None:
        key, sha = store.put_trained(
            shard.model_id,
            shard.index,
            version,
            result.adapter_state,
            result.adapter_config,
            manifest.to_json(),
        )
        manifest = replace(manifest, adapter_sha256=sha)

    discarded: list[str] = []
    try:
        with session_scope(engine) as session:
            adapter = registry.register_adapter_version(
                session, shard.key, manifest, key, started_generation=generation
            )
            promoted = adapter.state == "serving"
            adapter_id: int | None = adapter.id
            replaced = [
                (v.id, v.version, v.artifact_uri)
                for v in session.scalars(
                    select(AdapterVersion).where(
                        AdapterVersion.shard_id == shard.key, AdapterVersion.state != "serving"
                    )
                )
                if v.artifact_uri
            ]
    except registry.ManifestRejected as exc:
        if exc.field != "sample_pids":
            raise
        # newer erasures removed some of these samples while it trained: never registered, never
        # served; its weights go, and the shard (stale again) retrains on the newer remainder
        promoted, adapter_id, replaced = False, None, []
        with session_scope(engine) as session:
            audit.lock_chain(session)
            audit.append(
                session,
                "retrain_discarded",
                shard_id=shard.key,
                payload={"version": version, "reason": str(exc), "started_generation": generation},
            )
        if key and store.delete(key):
            discarded = [key]
    deleted = discarded + _delete_artifacts(engine, store, shard, replaced)
    if promoted and model_dir and (Path(model_dir) / "model.json").is_file():
        md = ModelDir(model_dir)
        if result is not None:
            md.save_shard(manifest, result.adapter_state, result.adapter_config)
        else:
            md.save_shard(manifest, None, None)
    log.info(
        "retrained %s v%d (%s)", shard, version, "promoted" if promoted else "not promoted: newer erasures"
    )
    return RetrainOutcome(shard, manifest, key, adapter_id, promoted, generation, deleted)


def _next_version(session: Session, shard: ShardRef, latest: AdapterVersion | None) -> int:
    """The next version number of a shard: never one used before, by a registered version or by a
    retrain that was discarded (its number is in the audit log)."""
    discarded = session.scalars(
        select(AuditLog.payload).where(
            AuditLog.shard_id == shard.key, AuditLog.event_type == "retrain_discarded"
        )
    )
    used = [latest.version if latest else 0, *(int(p.get("version", 0)) for p in discarded)]
    return max(used) + 1


def _delete_artifacts(
    engine: Engine, store: ArtifactStore, shard: ShardRef, versions: list[tuple[int, int, str]]
) -> list[str]:
    """Delete the weights of versions that no longer serve (trained on data erased since) and
    audit each deletion. A failed delete raises."""
    deleted = [(vid, version, key) for vid, version, key in versions if store.delete(key)]
    if deleted:
        with session_scope(engine) as session:
            audit.lock_chain(session)
            for vid, version, key in deleted:
                audit.append(
                    session,
                    "adapter_artifact_deleted",
                    shard_id=shard.key,
                    adapter_version_id=vid,
                    payload={"version": version, "artifact_key": key},
                )
    return [key for _, _, key in deleted]


def serving_refs(session: Session, model_id: str) -> dict[int, AdapterRef]:
    """Shard index -> the adapter version the registry lists as serving (shards that are stale, or
    serving with no adapter because they were emptied, are absent)."""
    refs: dict[int, AdapterRef] = {}
    for shard_id, version in registry.serving_adapters(session, model_id).items():
        if version.adapter_sha256 is None:
            continue
        index = ShardRef.parse(shard_id).index
        refs[index] = AdapterRef(index, version.version, version.adapter_sha256, version.artifact_uri)
    return refs


def stale_shard_refs(session: Session, model_id: str | None = None) -> list[ShardRef]:
    """Shards that are stale or retraining (to resume after a restart)."""
    return [ShardRef(s.model_id, s.index) for s in registry.stale_shards(session, model_id)]


def model_ids(session: Session) -> list[str]:
    return list(session.scalars(select(Model.id).order_by(Model.id)))


__all__ = [
    "ErasureOutcome",
    "RetrainOutcome",
    "ShardRef",
    "handle_erasure",
    "model_ids",
    "retrain_shard",
    "scrub_model_dirs",
    "serving_refs",
    "stale_shard_refs",
]
