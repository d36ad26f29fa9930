"""`apa bootstrap`: import a trained model directory (docs/LAYOUT.md) into the registry.

Loads the samples of every split with their shard assignment (partition.json), the interaction
index, one shard per partition shard, and each shard's adapter with its manifest (the adapter
file's sha256 must equal the manifest's `adapter_sha256`). Everything is validated before
anything is written, and the import is idempotent: running it again adds nothing. It refuses
to (re)import data of a user or interaction that was erased.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from apa.db import audit
from apa.db.models import (
    AdapterVersion,
    ErasureRequest,
    Interaction,
    Model,
    Sample,
    Shard,
    User,
    utcnow,
)
from apa.db.registry import ConflictError, ManifestRejected, register_adapter_version, shard_key
from apa.events import EventValidationError, parse_timestamp

SPLITS = ("train", "valid", "test")
ADAPTER_FILE = "adapter_model.safetensors"


class BootstrapError(ValueError):
    """The model directory cannot be imported (names the file and the problem)."""


@dataclass(frozen=True)
class ShardFiles:
    """Shard k of a model directory: its partition sample ids and, if trained, its manifest."""

    index: int
    sample_ids: list[str]
    manifest: dict[str, Any] | None
    adapter_dir: Path


@dataclass(frozen=True)
class ModelFiles:
    """A model directory, read and validated (nothing written yet)."""

    path: Path
    model: dict[str, Any]
    partition: dict[str, Any]
    samples: list[dict[str, Any]]
    """Every sample record, with `split` set from its file."""
    shards: list[ShardFiles]


@dataclass
class BootstrapResult:
    model_id: str
    model_created: bool = False
    samples_added: int = 0
    shards_added: int = 0
    adapters_registered: list[str] = field(default_factory=list)
    """`<shard>@v<version>` registered by this run."""
    adapters_already_registered: int = 0
    shards_without_adapter: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"model {self.model_id}: {'created' if self.model_created else 'already registered'}, "
            f"{self.samples_added} samples and {self.shards_added} shards added, "
            f"{len(self.adapters_registered)} adapter versions registered, "
            f"{self.adapters_already_registered} already registered"
            + (
                f", no adapter yet for {', '.join(self.shards_without_adapter)}"
                if self.shards_without_adapter
                else ""
            )
        )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BootstrapError(f"{path}: missing") from None
    except json.JSONDecodeError as exc:
        raise BootstrapError(f"{path}: not valid JSON ({exc})") from None


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_samples(path: Path, split: str) -> list[dict[str, Any]]:
    records = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BootstrapError(f"{where}: not valid JSON ({exc})") from None
            if not isinstance(record, dict):
                raise BootstrapError(f"{where}: expected a JSON object")
            for key in ("sample_id", "user_id"):
                if not isinstance(record.get(key), str) or not record[key]:
                    raise BootstrapError(f"{where}: {key} must be a non-empty string")
            ids = record.get("interaction_ids")
            if not isinstance(ids, list) or not ids or not all(isinstance(i, str) and i for i in ids):
                raise BootstrapError(f"{where}: interaction_ids must be a non-empty list of strings")
            if record.setdefault("split", split) != split:
                raise BootstrapError(f"{where}: split is {record['split']!r} in the {split} file")
            label = record.get("label")
            if label is not None and (not isinstance(label, int) or isinstance(label, bool)):
                raise BootstrapError(f"{where}: label must be 0 or 1")
            records.append(record)
    return records


def read_model_dir(path: str | Path) -> ModelFiles:
    """Read and validate a model directory; BootstrapError names the first problem."""
    root = Path(path)
    if not root.is_dir():
        raise BootstrapError(f"{root}: not a directory")
    model = _read_json(root / "model.json")
    partition = _read_json(root / "partition.json")
    if not isinstance(model, dict):
        raise BootstrapError(f"{root / 'model.json'}: expected a JSON object")
    if not isinstance(partition, dict) or not isinstance(partition.get("shards"), list):
        raise BootstrapError(f"{root / 'partition.json'}: expected an object with a `shards` list")

    samples: list[dict[str, Any]] = []
    for split in SPLITS:
        file = root / "data" / f"{split}.jsonl"
        if file.is_file():
            samples.extend(_read_samples(file, split))
        elif split == "train":
            raise BootstrapError(f"{file}: missing")
    seen: set[str] = set()
    for record in samples:
        if record["sample_id"] in seen:
            raise BootstrapError(f"{root / 'data'}: sample id {record['sample_id']!r} appears twice")
        seen.add(record["sample_id"])
    train_ids = {r["sample_id"] for r in samples if r["split"] == "train"}

    num_shards = len(partition["shards"])
    declared = model.get("num_shards", model.get("K"))
    if isinstance(declared, int) and declared != num_shards:
        raise BootstrapError(f"{root}: model.json says {declared} shards, partition.json has {num_shards}")
    assigned: set[str] = set()
    shards: list[ShardFiles] = []
    for k, ids in enumerate(partition["shards"]):
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise BootstrapError(f"{root / 'partition.json'}: shard {k} must be a list of sample ids")
        unknown = sorted(set(ids) - train_ids)
        if unknown:
            raise BootstrapError(
                f"{root / 'partition.json'}: shard {k} holds non-train samples {unknown[:5]}"
            )
        if assigned.intersection(ids):
            raise BootstrapError(f"{root / 'partition.json'}: shard {k} overlaps an earlier shard")
        assigned.update(ids)
        shard_dir = root / "shards" / str(k)
        manifest: dict[str, Any] | None = None
        if (shard_dir / "manifest.json").is_file():
            manifest = _read_json(shard_dir / "manifest.json")
            if not isinstance(manifest, dict):
                raise BootstrapError(f"{shard_dir / 'manifest.json'}: expected a JSON object")
            weights = shard_dir / "adapter" / ADAPTER_FILE
            if manifest.get("adapter_sha256") is None and not manifest.get("sample_ids"):
                pass  # every sample of the shard was erased: no adapter, nothing to check
            elif not weights.is_file():
                raise BootstrapError(f"{weights}: missing (shard {k} has a manifest)")
            elif (actual := _file_sha256(weights)) != manifest.get("adapter_sha256"):
                raise BootstrapError(
                    f"{weights}: sha256 {actual} does not match the manifest's adapter_sha256 "
                    f"{manifest.get('adapter_sha256')!r}; refusing to import shard {k}"
                )
            stray = sorted(set(manifest.get("sample_ids") or []) - set(ids))
            if stray:
                raise BootstrapError(f"{shard_dir / 'manifest.json'}: samples not in shard {k}: {stray[:5]}")
        shards.append(ShardFiles(k, list(ids), manifest, shard_dir / "adapter"))
    return ModelFiles(root, model, partition, samples, shards)


def _parse_created_at(model: dict[str, Any]) -> datetime | None:
    value = model.get("created_at")
    if not isinstance(value, str):
        return None
    try:
        return parse_timestamp(value, "created_at")
    except EventValidationError:
        return None


def bootstrap(
    session: Session, model_dir: str | Path, *, model_id: str | None = None, now: datetime | None = None
) -> BootstrapResult:
    """Import a model directory into the registry in the caller's transaction (idempotent)."""
    files = read_model_dir(model_dir)
    model_id = model_id or files.path.resolve().name
    now = now or utcnow()
    audit.lock_chain(session)  # serialise with every other registry writer
    session.expire_all()  # and read what they committed
    result = BootstrapResult(model_id)
    num_shards = len(files.shards)

    model = session.get(Model, model_id)
    if model is None:
        base = files.model.get("base_model")
        digest = files.model.get("base_model_digest")
        strategy = files.partition.get("strategy")
        model = Model(
            id=model_id,
            base_model=base if isinstance(base, str) else None,
            base_model_digest=digest if isinstance(digest, str) else None,
            num_shards=num_shards,
            partition_strategy=strategy if isinstance(strategy, str) else None,
            config=audit.json_roundtrip(files.model),
            model_dir=str(files.path.resolve()),
            created_at=_parse_created_at(files.model),
            registered_at=now,
        )
        session.add(model)
        session.flush()  # no ORM relationships: flush parents before children
        result.model_created = True
    elif model.num_shards != num_shards:
        raise BootstrapError(
            f"model {model_id!r} is registered with {model.num_shards} shards, not {num_shards}"
        )

    shard_of = {sid: shard_key(model_id, s.index) for s in files.shards for sid in s.sample_ids}
    existing = {
        sid: digest
        for sid, digest in session.execute(
            select(Sample.sample_id, Sample.content_digest).where(Sample.model_id == model_id)
        )
    }
    user_ids = sorted({r["user_id"] for r in files.samples})
    erased_users = (
        set(session.scalars(select(User.id).where(User.id.in_(user_ids), User.erased_at.is_not(None))))
        if user_ids
        else set()
    )
    erased_interactions: set[tuple[str, str]] = set()
    for user, erased_ids in session.execute(
        select(ErasureRequest.user_id, ErasureRequest.interactions).where(
            ErasureRequest.scope == "interactions"
        )
    ):
        erased_interactions.update((user, i) for i in erased_ids or [])

    new_samples: list[dict[str, Any]] = []
    for record in files.samples:
        text = audit.canonical_json(record)
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        sid = record["sample_id"]
        if sid in existing:
            if existing[sid] != digest:
                raise BootstrapError(f"sample {sid!r} of model {model_id!r} differs from the registered one")
            continue
        if record["user_id"] in erased_users:
            raise BootstrapError(f"sample {sid!r} belongs to erased user {record['user_id']!r}")
        hit = [i for i in record["interaction_ids"] if (record["user_id"], i) in erased_interactions]
        if hit:
            raise BootstrapError(f"sample {sid!r} holds erased interactions {hit[:5]}")
        new_samples.append(
            {
                "model_id": model_id,
                "sample_id": sid,
                "user_id": record["user_id"],
                "split": record["split"],
                "shard_id": shard_of.get(sid) if record["split"] == "train" else None,
                "label": record.get("label"),
                "content_digest": digest,
                "text": text,
                "interaction_ids": list(record["interaction_ids"]),
                "erased": False,
            }
        )

    known_users = set(session.scalars(select(User.id).where(User.id.in_(user_ids)))) if user_ids else set()
    for user_id in user_ids:
        if user_id not in known_users:
            session.add(User(id=user_id, registered_at=now))
    session.flush()
    known_shards = set(session.scalars(select(Shard.id).where(Shard.model_id == model_id)))
    for shard_files in files.shards:
        key = shard_key(model_id, shard_files.index)
        if key not in known_shards:
            session.add(
                Shard(
                    id=key,
                    model_id=model_id,
                    index=shard_files.index,
                    generation=0,
                    state="stale",
                    updated_at=now,
                )
            )
            result.shards_added += 1
    session.flush()

    if new_samples:
        session.execute(insert(Sample), new_samples)
        new_ids = {s["sample_id"] for s in new_samples}
        pks = {
            sid: pk
            for pk, sid in session.execute(
                select(Sample.id, Sample.sample_id).where(Sample.model_id == model_id)
            )
            if sid in new_ids
        }
        interactions = []
        for s in new_samples:
            ids = s["interaction_ids"]
            for interaction_id in dict.fromkeys(ids):  # the target is the last id
                role = "target" if interaction_id == ids[-1] else "history"
                interactions.append(
                    {
                        "interaction_id": interaction_id,
                        "sample_pk": pks[s["sample_id"]],
                        "user_id": s["user_id"],
                        "role": role,
                    }
                )
        if interactions:
            session.execute(insert(Interaction), interactions)
        result.samples_added = len(new_samples)

    if result.model_created or result.samples_added or result.shards_added:
        session.flush()
        audit.append(
            session,
            "model_bootstrapped",
            payload={
                "model_id": model_id,
                "model_dir": str(files.path.resolve()),
                "samples_added": result.samples_added,
                "shards_added": result.shards_added,
                "samples_digest": hashlib.sha256(
                    "\n".join(sorted(s["content_digest"] for s in new_samples)).encode()
                ).hexdigest(),
            },
            now=now,
        )

    for shard_files in files.shards:
        key = shard_key(model_id, shard_files.index)
        if shard_files.manifest is None:
            result.shards_without_adapter.append(key)
            continue
        digest = audit.manifest_digest(audit.json_roundtrip(shard_files.manifest))
        registered = session.scalars(
            select(AdapterVersion).where(
                AdapterVersion.shard_id == key, AdapterVersion.version == shard_files.manifest.get("version")
            )
        ).first()
        if registered is not None and registered.manifest_digest == digest:
            result.adapters_already_registered += 1
            continue
        try:
            adapter = register_adapter_version(
                session, key, shard_files.manifest, shard_files.adapter_dir.resolve().as_uri(), now=now
            )
        except (ManifestRejected, ConflictError) as exc:
            raise BootstrapError(f"{shard_files.adapter_dir.parent / 'manifest.json'}: {exc}") from exc
        result.adapters_registered.append(f"{key}@v{adapter.version}")
    session.flush()
    return result


def bootstrap_command(model_dir: str, model_id: str | None = None, url: str | None = None) -> int:
    """Import a trained model directory into the registry (idempotent).

    Loads the samples with their shard assignment, the interaction index, and each shard's
    adapter with its manifest; refuses an adapter whose sha256 differs from its manifest.

    Args:
        model_dir: the model directory written by `apa train` (docs/LAYOUT.md).
        model_id: registry id of the model (default: the directory's name).
        url: database URL (default: APA_DATABASE_URL).
    """
    from apa.db.session import check_schema, make_engine, session_scope

    engine = make_engine(url)
    try:
        check_schema(engine)
        with session_scope(engine) as session:
            result = bootstrap(session, model_dir, model_id=model_id)
        print(result.summary())
        return 0
    except BootstrapError as exc:
        print(f"apa bootstrap: {exc}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
