"""`apa bootstrap`: import a trained model directory (`apa.modeldir`) into the registry.

Reads the directory through `ModelDir` (typed, validated), then in the caller's transaction
loads the samples of every split with their shard assignment, the interaction index, the item
catalogue (item id -> title, from the samples' targets), one shard per partition shard, and each shard's adapter: copied into the artifact store (what serves reads
from there, never from the model directory) and registered with its manifest. Everything is
validated before anything is written, and the import is idempotent: running it again adds
nothing. It refuses to (re)import data of a user or interaction that was erased, and a directory
whose pseudonyms were made with another key than the registry's.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from apa.artifacts import ArtifactError, ArtifactStore
from apa.catalogue import catalogue_items
from apa.data import Sample as DataSample
from apa.data.loaders import DataFormatError
from apa.db import audit
from apa.db.models import (
    AdapterVersion,
    CatalogueItem,
    ErasureRequest,
    Interaction,
    Model,
    Sample,
    Shard,
    User,
    utcnow,
)
from apa.db.registry import (
    ConflictError,
    ManifestRejected,
    check_pseudonym_key,
    register_adapter_version,
    shard_key,
)
from apa.events import EventValidationError, parse_timestamp
from apa.ids import check_id
from apa.modeldir import ModelDir, ModelDirError, ModelInfo, ShardManifest
from apa.partition import Partition
from apa.pseudonyms import Pseudonymizer, PseudonymKeyMismatch


class BootstrapError(ValueError):
    """The model directory cannot be imported (names the file and the problem)."""


@dataclass(frozen=True)
class ModelFiles:
    """A model directory, read and validated (nothing written yet)."""

    path: Path
    info: ModelInfo
    partition: Partition
    samples: list[DataSample]
    manifests: list[ShardManifest | None]


@dataclass
class BootstrapResult:
    model_id: str
    model_created: bool = False
    samples_added: int = 0
    shards_added: int = 0
    items_added: int = 0
    """Items added to the item catalogue (item id -> title)."""
    adapters_registered: list[str] = field(default_factory=list)
    """`<shard>@v<version>` registered by this run."""
    adapters_already_registered: int = 0
    shards_without_adapter: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"model {self.model_id}: {'created' if self.model_created else 'already registered'}, "
            f"{self.samples_added} samples, {self.shards_added} shards and {self.items_added} catalogue items added, "
            f"{len(self.adapters_registered)} adapter versions registered, "
            f"{self.adapters_already_registered} already registered"
            + (
                f", no adapter yet for {', '.join(self.shards_without_adapter)}"
                if self.shards_without_adapter
                else ""
            )
        )


def read_model_dir(path: str | Path, pseudonymizer: Pseudonymizer) -> ModelFiles:
    """Read and validate a model directory; BootstrapError names the first problem."""
    md = ModelDir(path)
    if not md.root.is_dir():
        raise BootstrapError(f"{md.root}: not a directory")
    try:
        info = md.info
        md.check_key(pseudonymizer)
        parts = md.partition()
        splits = md.splits()
        manifests = md.manifests()
    except (ModelDirError, DataFormatError, FileNotFoundError, PseudonymKeyMismatch) as exc:
        raise BootstrapError(str(exc)) from None
    if len(parts.shards) != info.num_shards:
        raise BootstrapError(
            f"{md.root}: model.json says {info.num_shards} shards, partition.json has {len(parts.shards)}"
        )
    train_ids = {s.sample_id for s in splits["train"]}
    for k, ids in enumerate(parts.shards):
        unknown = sorted(set(ids) - train_ids)
        if unknown:
            raise BootstrapError(
                f"{md.root / 'partition.json'}: shard {k} holds non-train samples {unknown[:5]}"
            )
        manifest = manifests[k]
        if manifest is None:
            continue
        problem = md.verify_adapter_file(manifest)
        if problem:
            raise BootstrapError(f"{problem}; refusing to import shard {k}")
        expected = {pseudonymizer.sample(i) for i in ids}
        stray = set(manifest.sample_pids) - expected
        if stray:
            raise BootstrapError(
                f"{md.shard_dir(k) / 'manifest.json'}: {len(stray)} samples are not in shard {k} of the partition"
            )
    samples = [s for name in ("train", "valid", "test") for s in splits.get(name, [])]
    return ModelFiles(md.root, info, parts, samples, manifests)


def _id_ok(item_id: str) -> bool:
    try:
        check_id(item_id, "item_id")
    except ValueError:
        return False
    return True


def _parse_created_at(info: ModelInfo) -> datetime | None:
    try:
        return parse_timestamp(info.created_at, "created_at")
    except EventValidationError:
        return None


def bootstrap(
    session: Session,
    model_dir: str | Path,
    pseudonymizer: Pseudonymizer,
    store: ArtifactStore,
    *,
    model_id: str | None = None,
    now: datetime | None = None,
) -> BootstrapResult:
    """Import a model directory into the registry in the caller's transaction (idempotent); its
    adapters are copied into `store`."""
    files = read_model_dir(model_dir, pseudonymizer)
    model_id = model_id or files.path.resolve().name
    try:
        check_id(model_id, "model_id")
    except ValueError as exc:
        raise BootstrapError(f"model id {model_id!r}: {exc}") from None
    now = now or utcnow()
    audit.lock_chain(session)  # serialise with every other registry writer
    session.expire_all()  # and read what they committed
    try:
        check_pseudonym_key(session, pseudonymizer)
    except PseudonymKeyMismatch as exc:
        raise BootstrapError(str(exc)) from None
    result = BootstrapResult(model_id)
    num_shards = files.info.num_shards

    model = session.get(Model, model_id)
    if model is None:
        model = Model(
            id=model_id,
            base_model=files.info.base_model,
            base_model_digest=files.info.base_model_digest,
            num_shards=num_shards,
            partition_strategy=files.info.partition_config.strategy,
            config=audit.json_roundtrip(files.info.to_json()),
            model_dir=str(files.path.resolve()),
            created_at=_parse_created_at(files.info),
            registered_at=now,
        )
        session.add(model)
        session.flush()  # no ORM relationships: flush parents before children
        result.model_created = True
    elif model.num_shards != num_shards:
        raise BootstrapError(
            f"model {model_id!r} is registered with {model.num_shards} shards, not {num_shards}"
        )

    shard_of = {sid: shard_key(model_id, k) for k, ids in enumerate(files.partition.shards) for sid in ids}
    existing = {
        pid: digest
        for pid, digest in session.execute(
            select(Sample.sample_pid, Sample.content_hmac).where(Sample.model_id == model_id)
        )
    }
    user_pids = sorted({pseudonymizer.user(s.user_id) for s in files.samples})
    erased_users = (
        set(session.scalars(select(User.pid).where(User.pid.in_(user_pids), User.erased_at.is_not(None))))
        if user_pids
        else set()
    )
    erased_interactions: set[tuple[str, str]] = set()
    for user_pid, pids in session.execute(
        select(ErasureRequest.user_pid, ErasureRequest.interaction_pids).where(
            ErasureRequest.scope == "interactions"
        )
    ):
        erased_interactions.update((user_pid, p) for p in pids or [])

    new_samples: list[dict[str, object]] = []
    for sample in files.samples:
        text = audit.canonical_json(sample.to_dict())
        digest = pseudonymizer.content(text)
        sample_pid = pseudonymizer.sample(sample.sample_id)
        user_pid = pseudonymizer.user(sample.user_id)
        if sample_pid in existing:
            if existing[sample_pid] != digest:
                raise BootstrapError(
                    f"sample {sample.sample_id!r} of model {model_id!r} differs from the registered one"
                )
            continue
        if user_pid in erased_users:
            raise BootstrapError(f"sample {sample.sample_id!r} belongs to an erased user")
        interaction_pids = [pseudonymizer.interaction(i) for i in sample.interaction_ids]
        if any((user_pid, p) in erased_interactions for p in interaction_pids):
            raise BootstrapError(f"sample {sample.sample_id!r} holds an erased interaction")
        new_samples.append(
            {
                "model_id": model_id,
                "sample_pid": sample_pid,
                "user_pid": user_pid,
                "split": sample.split,
                "shard_id": shard_of.get(sample.sample_id) if sample.split == "train" else None,
                "label": sample.label,
                "content_hmac": digest,
                "text": text,
                "interaction_pids": interaction_pids,
                "erased": False,
            }
        )

    known_users = (
        set(session.scalars(select(User.pid).where(User.pid.in_(user_pids)))) if user_pids else set()
    )
    for user_pid in user_pids:
        if user_pid not in known_users:
            session.add(User(pid=user_pid, registered_at=now))
    session.flush()
    known_shards = set(session.scalars(select(Shard.id).where(Shard.model_id == model_id)))
    for k in range(num_shards):
        key = shard_key(model_id, k)
        if key not in known_shards:
            session.add(
                Shard(id=key, model_id=model_id, index=k, generation=0, state="stale", updated_at=now)
            )
            result.shards_added += 1
    session.flush()

    if new_samples:
        session.execute(insert(Sample), new_samples)
        new_pids = {str(s["sample_pid"]) for s in new_samples}
        pks = {
            pid: pk
            for pk, pid in session.execute(
                select(Sample.id, Sample.sample_pid).where(Sample.model_id == model_id)
            )
            if pid in new_pids
        }
        rows = []
        for s in new_samples:
            pids = list(s["interaction_pids"])  # type: ignore[call-overload]
            for interaction_pid in dict.fromkeys(pids):  # the target is the last one
                rows.append(
                    {
                        "interaction_pid": interaction_pid,
                        "sample_pk": pks[str(s["sample_pid"])],
                        "user_pid": s["user_pid"],
                        "role": "target" if interaction_pid == pids[-1] else "history",
                    }
                )
        if rows:
            session.execute(insert(Interaction), rows)
        result.samples_added = len(new_samples)

    known_items = set(
        session.scalars(select(CatalogueItem.item_id).where(CatalogueItem.model_id == model_id))
    )
    items = [
        {"model_id": model_id, "item_id": item, "title": title}
        for item, title in sorted(catalogue_items(files.samples).items())
        if item not in known_items and _id_ok(item)
    ]
    if items:
        session.execute(insert(CatalogueItem), items)
        result.items_added = len(items)

    if result.model_created or result.samples_added or result.shards_added:
        session.flush()
        audit.append(
            session,
            "model_bootstrapped",
            payload={
                "model_id": model_id,
                "samples_added": result.samples_added,
                "shards_added": result.shards_added,
                "samples_digest": hashlib.sha256(
                    "\n".join(sorted(str(s["content_hmac"]) for s in new_samples)).encode()
                ).hexdigest(),
                "pseudonym_key_id": pseudonymizer.key_id,
            },
            now=now,
        )

    md = ModelDir(files.path)
    for k, manifest in enumerate(files.manifests):
        key = shard_key(model_id, k)
        if manifest is None:
            result.shards_without_adapter.append(key)
            continue
        digest = audit.manifest_digest(audit.json_roundtrip(manifest.to_json()))
        registered = session.scalars(
            select(AdapterVersion).where(
                AdapterVersion.shard_id == key, AdapterVersion.version == manifest.version
            )
        ).first()
        if registered is not None and registered.manifest_digest == digest:
            result.adapters_already_registered += 1
            continue
        try:
            uri = (
                store.put(model_id, k, manifest.version, md.adapter_dir(k), manifest.to_json())
                if manifest.adapter_sha256 is not None
                else ""
            )
            adapter = register_adapter_version(session, key, manifest, uri, now=now)
        except (ManifestRejected, ConflictError, ArtifactError) as exc:
            raise BootstrapError(f"{md.shard_dir(k) / 'manifest.json'}: {exc}") from exc
        result.adapters_registered.append(f"{key}@v{adapter.version}")
    session.flush()
    return result


def bootstrap_command(model_dir: str, model_id: str | None = None, url: str | None = None) -> int:
    """Import a trained model directory into the registry and the artifact store (idempotent).

    Loads the samples with their shard assignment, the interaction index, and each shard's
    adapter with its manifest; refuses an adapter whose sha256 differs from its manifest.
    Settings: APA_DATABASE_URL, APA_ARTIFACT_STORE, APA_PSEUDONYM_KEY.

    Args:
        model_dir: the model directory written by `apa train`.
        model_id: registry id of the model (default: the directory's name).
        url: database URL (default: APA_DATABASE_URL).
    """
    from apa.db.session import check_schema, make_engine, session_scope
    from apa.pseudonyms import pseudonymizer_from_settings
    from apa.settings import Settings

    settings = Settings.from_env()
    engine = make_engine(url, settings=settings)
    try:
        check_schema(engine)
        with session_scope(engine) as session:
            result = bootstrap(
                session,
                model_dir,
                pseudonymizer_from_settings(settings),
                ArtifactStore(settings.artifact_store),
                model_id=model_id,
            )
        print(result.summary())
        return 0
    except BootstrapError as exc:
        print(f"apa bootstrap: {exc}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
