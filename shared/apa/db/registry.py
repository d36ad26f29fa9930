"""Registry state transitions (docs/ARCHITECTURE.md §5) and the compliance views built on them.

Every function takes a Session and works inside the caller's transaction (it never commits):
the erasure service commits before acknowledging the Kafka message. Each transition first locks
the audit chain (`audit.lock_chain`), which serialises all registry writers: an erasure and an
adapter promotion on the same shard can never interleave (a transaction takes the lock once, however
many transitions it holds: the erasure service applies a poll batch in one). Every state change
writes audit rows through `audit.append`.

State machines:
  shard:            serving -> stale (erasure) -> retraining (mark_retraining) -> serving (promotion);
                    a retraining shard hit by a newer erasure goes back to stale.
  adapter version:  serving -> excluded (erasure hit its data) | retired (a newer version promoted);
                    a version registered after newer erasures hit its shard is `stale`, never served.
  erasure request:  received -> excluded -> retraining -> completed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from apa.db import audit
from apa.db.models import (
    AdapterVersion,
    ErasureRequest,
    ErasureRequestShard,
    Interaction,
    RegistryMeta,
    Replica,
    Sample,
    Shard,
    User,
    utcnow,
)
from apa.deadlines import due_date
from apa.events import ErasureRequested, parse_timestamp
from apa.pseudonyms import Pseudonymizer

if TYPE_CHECKING:
    from apa.modeldir import ShardManifest

DEFAULT_REPLICA_LIVE_SECONDS = 60.0
"""A replica whose last heartbeat is older than this no longer counts as serving."""


class RegistryError(Exception):
    """A registry transition was refused."""


class NotFoundError(RegistryError, LookupError):
    """The named request, user, shard or adapter does not exist."""


class ConflictError(RegistryError):
    """The transition contradicts the registry's state (e.g. a request id reused for another user)."""


class ManifestRejected(RegistryError, ValueError):
    """A training manifest that must not be registered; `field` names the manifest field."""

    def __init__(self, field: str, message: str, sample_pids: Sequence[str] = ()) -> None:
        super().__init__(f"manifest {field}: {message}")
        self.field = field
        self.sample_pids = list(sample_pids)


PSEUDONYM_KEY_ID = "pseudonym_key_id"


def check_pseudonym_key(session: Session, pseudonymizer: Pseudonymizer) -> None:
    """Refuse (PseudonymKeyMismatch) to work on a registry whose pseudonyms were made with another
    key: its erasures would silently find nothing. The first writer records its key's fingerprint."""
    checked = f"{PSEUDONYM_KEY_ID}:{pseudonymizer.key_id}"
    if audit.was_checked(session, checked):
        return  # already in this transaction (several erasures in one)
    row = session.get(RegistryMeta, PSEUDONYM_KEY_ID)
    if row is None:
        session.add(RegistryMeta(key=PSEUDONYM_KEY_ID, value=pseudonymizer.key_id))
        session.flush()
    else:
        pseudonymizer.check_key_id(row.value, "the registry")
    audit.mark_checked(session, checked)


def _begin(session: Session, *, erasure: bool = False) -> None:
    """Start a transition: take the chain lock (serialising registry writers), then forget what the
    session cached before the lock, so every decision reads the newest committed state. A session
    that already holds the lock in this transaction (several erasures in one transaction) keeps
    what it read under the lock: it is current, as every other writer waits for the lock. The rows
    erasures keep for each other (`audit.held_cache`) are dropped by any other transition."""
    fresh = audit.lock_is_fresh(session)
    audit.lock_chain(session, keep_cache=erasure)
    if fresh:
        session.expire_all()


def prefetch_erasures(
    session: Session, events: Sequence[ErasureRequested], pseudonymizer: Pseudonymizer
) -> None:
    """Read what a batch of erasures will look at (their request ids, users and the users' samples)
    in three queries, for `record_erasure` to find in `audit.held_cache` instead of three queries
    per event. Only under the chain lock (otherwise it does nothing): nobody else changes these rows
    until the transaction ends."""
    cache = audit.held_cache(session)
    if cache is None or not events:
        return
    ids = sorted({e.request_id for e in events})
    known = {
        r.request_id: r
        for r in session.scalars(select(ErasureRequest).where(ErasureRequest.request_id.in_(ids)))
    }
    requests = cache.setdefault("requests", {})
    for request_id in ids:
        requests.setdefault(request_id, known.get(request_id))
    pids = sorted({pseudonymizer.user(e.user_id) for e in events})
    found = {u.pid: u for u in session.scalars(select(User).where(User.pid.in_(pids)))}
    users = cache.setdefault("users", {})
    for pid in pids:
        users.setdefault(pid, found.get(pid))
    whole = sorted({pseudonymizer.user(e.user_id) for e in events if e.interactions is None})
    by_user: dict[str, list[Sample]] = {pid: [] for pid in whole}
    if whole:
        for sample in session.scalars(select(Sample).where(Sample.user_pid.in_(whole)).order_by(Sample.id)):
            by_user[sample.user_pid].append(sample)
    samples = cache.setdefault("samples", {})
    for pid, rows in by_user.items():
        samples.setdefault(pid, rows)


def shard_key(model_id: str, index: int) -> str:
    """The registry id of shard k of a model: `<model_id>/<k>`."""
    return f"{model_id}/{index}"


# --- erasure ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ErasureResult:
    """What `record_erasure` did."""

    request: ErasureRequest
    created: bool
    """False when the request id was already recorded (a redelivery: nothing changed)."""
    erased_samples: list[str]
    """`<model_id>/<sample pid>` of the samples this call erased."""
    stale_shards: list[str]
    """Shards whose data changed in this call: stale now, to be retrained."""
    generations: dict[str, int] = field(default_factory=dict)
    """The new generation of each of `stale_shards`."""


def record_erasure(
    session: Session,
    event: ErasureRequested,
    pseudonymizer: Pseudonymizer,
    *,
    now: datetime | None = None,
) -> ErasureResult:
    """Record an erasure request and exclude its data, in the caller's (one) transaction.

    Idempotent by request id: a second call with the same id changes nothing and returns the
    existing request (ConflictError if it names another user or other interactions). Otherwise:
    erase every sample of the user (whole-user scope) or every sample of the user holding one of
    the interactions, as history or target, in every split; mark their train shards stale, bump
    their generation and exclude their serving adapter versions; set the request `excluded`
    (`completed` at once when no shard is affected).

    Only pseudonyms are stored: the erased samples lose their record, label and interaction
    index rows, and the request and audit rows name the user and interactions by pseudonym.
    """
    _begin(session, erasure=True)
    check_pseudonym_key(session, pseudonymizer)
    cache = audit.held_cache(session)
    assert cache is not None  # _begin took the lock
    requests: dict[str, ErasureRequest | None] = cache.setdefault("requests", {})
    users: dict[str, User | None] = cache.setdefault("users", {})
    user_pid = pseudonymizer.user(event.user_id)
    interaction_pids = (
        sorted({pseudonymizer.interaction(i) for i in event.interactions})
        if event.interactions is not None
        else None
    )
    if event.request_id in requests:
        existing = requests[event.request_id]
    else:
        existing = session.get(ErasureRequest, event.request_id, populate_existing=True)
    if existing is not None:
        same = existing.user_pid == user_pid and existing.interaction_pids == interaction_pids
        if not same or existing.scope != event.scope:
            raise ConflictError(
                f"request {event.request_id!r} was already recorded for another user or other interactions"
            )
        return ErasureResult(existing, created=False, erased_samples=[], stale_shards=[])

    now = now or utcnow()
    user = users[user_pid] if user_pid in users else session.get(User, user_pid)
    user_known = user is not None
    if user is None:
        user = User(pid=user_pid, registered_at=now)
        session.add(user)
        session.flush()  # no ORM relationships: flush parents before children
    users[user_pid] = user
    requested_at = parse_timestamp(event.requested_at, "requested_at")
    prefetched = cache.get("samples", {}).get(user_pid) if interaction_pids is None else None
    matched = (
        list(prefetched) if prefetched is not None else _matching_samples(session, user_pid, interaction_pids)
    )
    newly_erased = [s for s in matched if not s.erased]
    request = ErasureRequest(
        request_id=event.request_id,
        user_pid=user_pid,
        scope=event.scope,
        interaction_pids=interaction_pids,
        status="received",
        requested_at=requested_at,
        received_at=now,
        samples_erased=len(newly_erased),
        outcome="erased" if matched else "no_data_held",
        due_at=due_date(requested_at),
    )
    session.add(request)
    session.flush()  # the parent of the samples' erasure_request_id and of the shard links
    requests[request.request_id] = request
    audit.append(
        session,
        "erasure_received",
        request_id=request.request_id,
        user_pid=request.user_pid,
        payload={
            "scope": request.scope,
            "interaction_pids": request.interaction_pids,
            "requested_at": event.requested_at,
        },
        now=now,
    )

    if not matched:
        # An unknown user or interactions no sample holds: completed below with nothing found, and
        # said so distinctly (a typo in an id must not look like a normal success).
        audit.append(
            session,
            "erasure_no_data_held",
            request_id=request.request_id,
            user_pid=request.user_pid,
            payload={"scope": request.scope, "user_known": user_known},
            now=now,
        )
    for sample in newly_erased:
        sample.erased = True
        sample.erased_at = now
        sample.text = None
        sample.label = None
        sample.interaction_pids = None
        sample.erasure_request_id = request.request_id
    if newly_erased:
        with session.no_autoflush:  # the pending rows (audit, samples) do not touch interactions
            session.execute(
                delete(Interaction)
                .where(Interaction.sample_pk.in_([s.id for s in newly_erased]))
                .execution_options(synchronize_session=False)
            )
    if event.interactions is None and user.erased_at is None:
        user.erased_at = now
    audit.append(
        session,
        "samples_erased",
        request_id=request.request_id,
        user_pid=request.user_pid,
        payload={
            "count": len(newly_erased),
            "already_erased": len(matched) - len(newly_erased),
            "samples": [
                {
                    "model_id": s.model_id,
                    "sample_pid": s.sample_pid,
                    "split": s.split,
                    "shard_id": s.shard_id,
                    "content_hmac": s.content_hmac,
                }
                for s in newly_erased
            ],
        },
        now=now,
    )

    stale_shards = sorted({s.shard_id for s in newly_erased if s.shard_id is not None})
    affected = sorted({s.shard_id for s in matched if s.shard_id is not None})
    # the affected shards and their serving versions, read once (not one query per shard)
    # (kept for the next erasures of the transaction: only lock holders change them)
    known_shards: dict[str, Shard | None] = cache.setdefault("shards", {})
    known_serving: dict[str, AdapterVersion | None] = cache.setdefault("serving", {})
    missing = [shard_id for shard_id in affected if shard_id not in known_shards]
    unknown = [shard_id for shard_id in affected if shard_id not in known_serving]
    with session.no_autoflush:  # what is pending (samples, audit rows) does not change these reads
        if missing:
            found = {s.id: s for s in session.scalars(select(Shard).where(Shard.id.in_(missing)))}
            known_shards.update({shard_id: found.get(shard_id) for shard_id in missing})
        if unknown:
            versions = _serving_versions(session, unknown)
            known_serving.update({shard_id: versions.get(shard_id) for shard_id in unknown})
    shards = {shard_id: known_shards[shard_id] for shard_id in affected}
    serving = {shard_id: v for shard_id in affected if (v := known_serving[shard_id]) is not None}
    excluded_by_shard: dict[str, int | None] = {}
    generations: dict[str, int] = {}
    for shard_id in stale_shards:
        excluded_by_shard[shard_id], generations[shard_id] = _make_stale(
            session, shards.get(shard_id), shard_id, serving.pop(shard_id, None), request, now
        )
        known_serving[shard_id] = None  # excluded

    pending: list[Shard] = []
    for shard_id in affected:
        link = ErasureRequestShard(
            request_id=request.request_id,
            shard_id=shard_id,
            excluded_version_id=excluded_by_shard.get(shard_id),
        )
        shard = shards.get(shard_id)
        if shard_id not in excluded_by_shard and shard is not None and shard.state == "serving":
            # Already-erased samples on a shard that has since been retrained: nothing to wait for.
            current = serving.get(shard_id)
            link.retrained_version_id = current.id if current else None
            link.retrained_at = (current.promoted_at if current else None) or now
        if link.retrained_version_id is None and shard is not None:
            pending.append(shard)
        session.add(link)

    request.status = "excluded"
    request.excluded_at = now
    audit.append(
        session,
        "erasure_excluded",
        request_id=request.request_id,
        user_pid=request.user_pid,
        payload={
            "affected_shards": affected,
            "stale_shards": stale_shards,
            "samples_erased": len(newly_erased),
        },
        now=now,
    )
    _advance_request(session, request, now, pending=pending)
    # No replica confirmation here: it needs a heartbeat sent after this exclusion, so it comes with
    # the next heartbeat or status read (and the erasure transaction stays cheap for group commit).
    return ErasureResult(
        request,
        created=True,
        erased_samples=[f"{s.model_id}/{s.sample_pid}" for s in newly_erased],
        stale_shards=stale_shards,
        generations=generations,
    )


def _matching_samples(session: Session, user_pid: str, interaction_pids: list[str] | None) -> list[Sample]:
    """The user's samples the request reaches (never another user's); with interactions, the live
    samples holding one of them (erased samples have no interaction rows left)."""
    query = select(Sample).where(Sample.user_pid == user_pid)
    if interaction_pids is not None:
        holding = select(Interaction.sample_pk).where(
            Interaction.user_pid == user_pid, Interaction.interaction_pid.in_(interaction_pids)
        )
        query = query.where(Sample.id.in_(holding))
    return list(session.scalars(query.order_by(Sample.id)))


def _make_stale(
    session: Session,
    shard: Shard | None,
    shard_id: str,
    excluded: AdapterVersion | None,
    request: ErasureRequest,
    now: datetime,
) -> tuple[int | None, int]:
    """Shard data changed: stale, next generation, its serving adapter version (`excluded`, read by
    the caller) excluded. Returns that version's id and the new generation."""
    if shard is None:  # pragma: no cover - foreign key
        raise NotFoundError(f"shard {shard_id!r}")
    previous = shard.state
    shard.state = "stale"
    shard.generation += 1
    shard.updated_at = now
    if excluded is not None:
        excluded.state = "excluded"
        excluded.excluded_at = now
    audit.append(
        session,
        "shard_stale",
        request_id=request.request_id,
        user_pid=request.user_pid,
        shard_id=shard_id,
        adapter_version_id=excluded.id if excluded else None,
        payload={
            "previous_state": previous,
            "generation": shard.generation,
            "excluded_version": excluded.version if excluded else None,
        },
        now=now,
    )
    return (excluded.id if excluded else None), shard.generation


def _serving_versions(session: Session, shard_ids: Sequence[str]) -> dict[str, AdapterVersion]:
    """Shard id -> its serving adapter version, for several shards in one query."""
    out: dict[str, AdapterVersion] = {}
    for version in session.scalars(
        select(AdapterVersion)
        .where(AdapterVersion.shard_id.in_(shard_ids), AdapterVersion.state == "serving")
        .order_by(AdapterVersion.id)
    ):
        if version.state == "serving":  # not excluded meanwhile in this session (not flushed yet)
            out.setdefault(version.shard_id, version)
    return out


def _advance_request(
    session: Session, request: ErasureRequest, now: datetime, *, pending: Sequence[Shard] | None = None
) -> None:
    """Move an excluded/retraining request on: retraining when one of its pending shards retrains,
    completed when none is pending. `pending`: its shards not retrained yet, when the caller knows
    them (it just linked them), else read from the registry."""
    if request.status == "completed":
        return
    known = pending is not None
    if pending is None:
        pending = list(
            session.scalars(
                select(Shard)
                .join(ErasureRequestShard, ErasureRequestShard.shard_id == Shard.id)
                .where(
                    ErasureRequestShard.request_id == request.request_id,
                    ErasureRequestShard.retrained_version_id.is_(None),
                )
            )
        )
    if not pending:
        request.status = "completed"
        request.completed_at = now
        audit.append(
            session,
            "erasure_completed",
            request_id=request.request_id,
            user_pid=request.user_pid,
            payload={},
            now=now,
        )
    elif request.status == "excluded" and any(s.state == "retraining" for s in pending):
        request.status = "retraining"
        request.retraining_at = now
        audit.append(
            session,
            "erasure_retraining",
            request_id=request.request_id,
            user_pid=request.user_pid,
            payload={"retraining_shards": sorted(s.id for s in pending if s.state == "retraining")},
            now=now,
        )
    if not known:  # the caller flushes (or commits) what it knows
        session.flush()


# --- retraining ------------------------------------------------------------------------------------


def mark_retraining(session: Session, shard_id: str, *, now: datetime | None = None) -> int:
    """A retrain of a stale shard starts. Returns the shard generation it trains on: pass it to
    `register_adapter_version(started_generation=...)` so a result overtaken by newer erasures is
    not promoted. ConflictError if the shard is serving (nothing to retrain)."""
    _begin(session)
    now = now or utcnow()
    shard = session.get(Shard, shard_id, populate_existing=True)
    if shard is None:
        raise NotFoundError(f"shard {shard_id!r}")
    if shard.state == "serving":
        raise ConflictError(f"shard {shard_id!r} is serving; only a stale shard is retrained")
    shard.state = "retraining"
    shard.retrain_generation = shard.generation
    shard.updated_at = now
    session.flush()
    audit.append(
        session, "shard_retraining", shard_id=shard_id, payload={"generation": shard.generation}, now=now
    )
    for request in _open_requests_waiting_on(session, shard_id):
        _advance_request(session, request, now)
    return shard.generation


def _open_requests_waiting_on(session: Session, shard_id: str) -> list[ErasureRequest]:
    return list(
        session.scalars(
            select(ErasureRequest)
            .join(ErasureRequestShard, ErasureRequestShard.request_id == ErasureRequest.request_id)
            .where(
                ErasureRequestShard.shard_id == shard_id,
                ErasureRequestShard.retrained_version_id.is_(None),
                ErasureRequest.status.in_(("excluded", "retraining")),
            )
            .order_by(ErasureRequest.received_at, ErasureRequest.request_id)
        )
    )


def parse_manifest(shard: Shard, manifest: ShardManifest | Mapping[str, Any]) -> ShardManifest:
    """A manifest as the typed `ShardManifest` (`apa.modeldir`), checked against the shard;
    ManifestRejected names the field otherwise."""
    from apa.modeldir import ModelDirError, ShardManifest

    if not isinstance(manifest, ShardManifest):
        try:
            manifest = ShardManifest.from_json(manifest, f"manifest of shard {shard.id}")
        except ModelDirError as exc:
            raise ManifestRejected("manifest", str(exc)) from None
    if manifest.shard_index != shard.index:
        raise ManifestRejected("shard_index", f"is {manifest.shard_index}, not shard {shard.id!r}")
    if manifest.adapter_sha256 is not None and (
        len(manifest.adapter_sha256) != 64
        or any(c not in "0123456789abcdef" for c in manifest.adapter_sha256)
    ):
        raise ManifestRejected("adapter_sha256", "must be a lowercase hex sha256")
    try:
        parse_timestamp(manifest.trained_at, "trained_at")
    except ValueError:
        raise ManifestRejected("trained_at", "must be an ISO-8601 timestamp") from None
    return manifest


def register_adapter_version(
    session: Session,
    shard_id: str,
    manifest: ShardManifest | Mapping[str, Any],
    artifact_uri: str,
    *,
    started_generation: int | None = None,
    now: datetime | None = None,
) -> AdapterVersion:
    """Register a trained adapter of a shard and promote it to serving when it is current.

    Refuses (ManifestRejected) a manifest holding an erased sample, a sample that is not the
    shard's, or pseudonyms made with another key. The version is promoted only when the shard's
    generation still equals the one its training data was taken at (`started_generation`,
    default: the generation `mark_retraining` recorded); otherwise it is registered in state
    `stale` and the shard stays stale (a retrain that finishes after newer erasures is not
    promoted). Promotion sets the shard serving, retires the previous serving version and
    completes the erasure requests whose shards are all serving again. Registering the same
    manifest twice returns the existing version.
    """
    _begin(session)
    now = now or utcnow()
    shard = session.get(Shard, shard_id, populate_existing=True)
    if shard is None:
        raise NotFoundError(f"shard {shard_id!r}")
    typed = parse_manifest(shard, manifest)
    meta = session.get(RegistryMeta, PSEUDONYM_KEY_ID)
    if meta is not None and meta.value != typed.pseudonym_key_id:
        raise ManifestRejected(
            "pseudonym_key_id", f"is {typed.pseudonym_key_id}, the registry's pseudonyms use key {meta.value}"
        )
    version, sample_pids, adapter_sha = typed.version, list(typed.sample_pids), typed.adapter_sha256
    manifest_dict = audit.json_roundtrip(typed.to_json())
    digest = audit.manifest_digest(manifest_dict)

    existing = session.scalars(
        select(AdapterVersion).where(AdapterVersion.shard_id == shard_id, AdapterVersion.version == version)
    ).first()
    if existing is not None:
        if existing.manifest_digest == digest:
            return existing
        raise ConflictError(f"shard {shard_id!r} already has a different version {version}")

    known = {
        pid: erased
        for pid, erased in session.execute(
            select(Sample.sample_pid, Sample.erased).where(Sample.shard_id == shard_id)
        )
    }
    unknown = sorted(i for i in sample_pids if i not in known)
    if unknown:
        raise ManifestRejected("sample_pids", f"{len(unknown)} samples are not in shard {shard_id}", unknown)
    erased = sorted(i for i in sample_pids if known[i])
    if erased:
        raise ManifestRejected("sample_pids", f"{len(erased)} samples were erased", erased)

    generation = started_generation
    if generation is None:
        generation = shard.retrain_generation if shard.retrain_generation is not None else shard.generation
    promote = generation == shard.generation
    adapter = AdapterVersion(
        shard_id=shard_id,
        version=version,
        artifact_uri=artifact_uri,
        adapter_sha256=adapter_sha,
        manifest_digest=digest,
        sample_digest=typed.sample_digest,
        num_samples=len(sample_pids),
        manifest=manifest_dict,
        trained_at=parse_timestamp(typed.trained_at, "trained_at"),
        registered_at=now,
        started_generation=generation,
        state="serving" if promote else "stale",
    )
    session.add(adapter)
    session.flush()
    audit.append(
        session,
        "adapter_registered",
        shard_id=shard_id,
        adapter_version_id=adapter.id,
        payload={
            "version": version,
            "artifact_uri": artifact_uri,
            "adapter_sha256": adapter_sha,
            "manifest_digest": digest,
            "sample_digest": adapter.sample_digest,
            "num_samples": len(sample_pids),
            "started_generation": generation,
            "shard_generation": shard.generation,
            "promoted": promote,
        },
        now=now,
    )
    if promote:
        _promote(session, shard, adapter, now)
    return adapter


def _promote(session: Session, shard: Shard, adapter: AdapterVersion, now: datetime) -> None:
    retired = [
        v
        for v in session.scalars(
            select(AdapterVersion).where(
                AdapterVersion.shard_id == shard.id,
                AdapterVersion.state == "serving",
                AdapterVersion.id != adapter.id,
            )
        )
    ]
    for old in retired:
        old.state = "retired"
        old.retired_at = now
    adapter.state = "serving"
    adapter.promoted_at = now
    shard.state = "serving"
    shard.retrain_generation = None
    shard.updated_at = now
    session.flush()
    audit.append(
        session,
        "adapter_promoted",
        shard_id=shard.id,
        adapter_version_id=adapter.id,
        payload={
            "version": adapter.version,
            "generation": shard.generation,
            "retired": [v.version for v in retired],
        },
        now=now,
    )
    for request in _open_requests_waiting_on(session, shard.id):
        link = session.get(ErasureRequestShard, (request.request_id, shard.id))
        assert link is not None
        link.retrained_version_id = adapter.id
        link.retrained_at = now
        session.flush()
        audit.append(
            session,
            "erasure_shard_retrained",
            request_id=request.request_id,
            user_pid=request.user_pid,
            shard_id=shard.id,
            adapter_version_id=adapter.id,
            payload={"version": adapter.version},
            now=now,
        )
        _advance_request(session, request, now)


# --- replicas --------------------------------------------------------------------------------------


def record_replica_heartbeat(
    session: Session,
    replica_id: str,
    loaded: Mapping[str, int],
    *,
    model_id: str | None = None,
    now: datetime | None = None,
    live_seconds: float = DEFAULT_REPLICA_LIVE_SECONDS,
) -> Replica:
    """An inference replica reports the adapter versions it has loaded (shard id -> version).

    A change of the loaded set is audited. Then every excluded request not yet confirmed is
    re-evaluated (`replica_confirmation`) and confirmed when its time has come.
    """
    if not isinstance(replica_id, str) or not replica_id:
        raise ValueError("replica_id must be a non-empty string")
    clean: dict[str, int] = {}
    for shard_id, version in loaded.items():
        if not isinstance(shard_id, str) or not isinstance(version, int) or isinstance(version, bool):
            raise ValueError(f"loaded: expected shard id -> version number, got {shard_id!r}: {version!r}")
        clean[shard_id] = version
    _begin(session)
    now = now or utcnow()
    replica = session.get(Replica, replica_id, populate_existing=True)
    changed = replica is None or replica.loaded != clean or replica.model_id != model_id
    if replica is None:
        replica = Replica(
            id=replica_id, first_seen=now, loaded=clean, loaded_changed_at=now, last_heartbeat=now
        )
        session.add(replica)
    replica.last_heartbeat = now
    if changed:
        replica.loaded = clean
        replica.model_id = model_id
        replica.loaded_changed_at = now
        session.flush()
        audit.append(
            session,
            "replica_loaded",
            payload={"replica_id": replica_id, "model_id": model_id, "loaded": clean},
            now=now,
        )
    session.flush()
    _confirm_replicas(session, now, live_seconds, _unconfirmed_requests(session))
    return replica


REPLICA_STATES = ("confirmed", "waiting", "no_live_replica")
"""Where a request's exclusion stands on the inference replicas (`ReplicaConfirmation.state`)."""


@dataclass(frozen=True)
class ReplicaConfirmation:
    """Whether the live inference replicas have dropped what an erasure request excluded.

    A replica is live while its last heartbeat is younger than the live window, and counts for a
    request when it serves one of the models of the request's shards (or names no model). The
    exclusion is confirmed when at least one replica counts, and every counting replica has sent a
    heartbeat since the exclusion that lists no version of an affected shard the registry does not
    serve (the excluded version, or an older one). Never vacuously: without a live replica the
    state is `no_live_replica`. A replica that stops heartbeating stops counting (and blocking)
    once its last heartbeat leaves the live window.
    """

    state: str
    """`confirmed` (recorded: `replicas_confirmed_at`), `waiting` or `no_live_replica`."""
    live: list[str]
    """The live replicas that count for the request, now."""
    pending: list[str]
    """Live replicas that still report a non-serving version of an affected shard."""
    unreported: list[str]
    """Live replicas whose last heartbeat predates the exclusion (not heard from since)."""
    confirmed_at: datetime | None
    live_seconds: float

    @property
    def due(self) -> bool:
        """Not recorded yet, but every counting live replica has dropped the excluded versions."""
        return self.confirmed_at is None and bool(self.live) and not self.pending and not self.unreported

    def view(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "confirmed_at": _iso(self.confirmed_at),
            "live": self.live,
            "pending": self.pending,
            "unreported": self.unreported,
            "live_seconds": self.live_seconds,
        }


@dataclass(frozen=True)
class _ReplicaSnapshot:
    """What confirmation decisions read once per call: live replicas and the serving versions."""

    live: list[Replica]
    serving: set[tuple[str, int]]

    @classmethod
    def read(cls, session: Session, now: datetime, live_seconds: float) -> _ReplicaSnapshot:
        live = session.scalars(
            select(Replica)
            .where(Replica.last_heartbeat >= now - timedelta(seconds=live_seconds))
            .order_by(Replica.id)
        )
        serving = session.execute(
            select(AdapterVersion.shard_id, AdapterVersion.version).where(AdapterVersion.state == "serving")
        )
        return cls(list(live), {(shard_id, version) for shard_id, version in serving})


def replica_confirmation(
    session: Session,
    request: ErasureRequest,
    *,
    now: datetime | None = None,
    live_seconds: float = DEFAULT_REPLICA_LIVE_SECONDS,
    snapshot: _ReplicaSnapshot | None = None,
) -> ReplicaConfirmation:
    """Where `request`'s exclusion stands on the live replicas (a read; `confirm_due_replicas`
    records a confirmation that is due)."""
    now = now or utcnow()
    snapshot = snapshot or _ReplicaSnapshot.read(session, now, live_seconds)
    affected = list(
        session.execute(
            select(ErasureRequestShard.shard_id, Shard.model_id)
            .join(Shard, Shard.id == ErasureRequestShard.shard_id)
            .where(ErasureRequestShard.request_id == request.request_id)
        )
    )
    shards = {shard_id for shard_id, _ in affected}
    models = {model_id for _, model_id in affected}
    live = [r for r in snapshot.live if not models or r.model_id is None or r.model_id in models]
    pending = [
        r.id for r in live if any(s in r.loaded and (s, r.loaded[s]) not in snapshot.serving for s in shards)
    ]
    excluded_at = request.excluded_at
    unreported = [
        r.id for r in live if r.id not in pending and (excluded_at is None or r.last_heartbeat < excluded_at)
    ]
    if request.replicas_confirmed_at is not None:
        state = "confirmed"
    elif not live:
        state = "no_live_replica"
    else:
        state = "waiting"
    return ReplicaConfirmation(
        state=state,
        live=[r.id for r in live],
        pending=pending,
        unreported=unreported,
        confirmed_at=request.replicas_confirmed_at,
        live_seconds=live_seconds,
    )


def _unconfirmed_requests(
    session: Session, request_ids: Sequence[str] | None = None, user_pid: str | None = None
) -> list[ErasureRequest]:
    """Excluded requests not replica-confirmed yet (of these ids, of this user; default: all)."""
    query = select(ErasureRequest).where(
        ErasureRequest.replicas_confirmed_at.is_(None), ErasureRequest.excluded_at.is_not(None)
    )
    if request_ids is not None:
        query = query.where(ErasureRequest.request_id.in_(request_ids))
    if user_pid is not None:
        query = query.where(ErasureRequest.user_pid == user_pid)
    return list(session.scalars(query.order_by(ErasureRequest.received_at)))


def confirm_due_replicas(
    session: Session,
    request_ids: Sequence[str] | None = None,
    *,
    user_pid: str | None = None,
    now: datetime | None = None,
    live_seconds: float = DEFAULT_REPLICA_LIVE_SECONDS,
) -> list[str]:
    """Record the replica confirmations that have become due with time (a blocking replica left
    the live window) among `request_ids` and the requests of `user_pid` (default: every
    unconfirmed request), audited; returns the ids confirmed. Reads first and takes the chain lock
    only when one is due, so a status read can call it cheaply."""
    now = now or utcnow()
    requests = _unconfirmed_requests(session, request_ids, user_pid)
    if not requests:
        return []
    snapshot = _ReplicaSnapshot.read(session, now, live_seconds)
    if not any(
        replica_confirmation(session, r, now=now, live_seconds=live_seconds, snapshot=snapshot).due
        for r in requests
    ):
        return []
    _begin(session)
    return _confirm_replicas(
        session, now, live_seconds, _unconfirmed_requests(session, request_ids, user_pid)
    )


def _confirm_replicas(
    session: Session, now: datetime, live_seconds: float, requests: Sequence[ErasureRequest]
) -> list[str]:
    """Confirm (audited) each of `requests` whose confirmation is due; the caller holds the chain lock."""
    if not requests:
        return []
    snapshot = _ReplicaSnapshot.read(session, now, live_seconds)
    confirmed: list[str] = []
    for request in requests:
        if request.replicas_confirmed_at is not None or request.excluded_at is None:
            continue
        status = replica_confirmation(session, request, now=now, live_seconds=live_seconds, snapshot=snapshot)
        if not status.due:
            continue
        request.replicas_confirmed_at = now
        audit.append(
            session,
            "replicas_confirmed",
            request_id=request.request_id,
            user_pid=request.user_pid,
            payload={
                "live_replicas": status.live,
                "loaded": {r.id: r.loaded for r in snapshot.live if r.id in status.live},
                "shards": sorted(
                    session.scalars(
                        select(ErasureRequestShard.shard_id).where(
                            ErasureRequestShard.request_id == request.request_id
                        )
                    )
                ),
                "live_seconds": live_seconds,
            },
            now=now,
        )
        confirmed.append(request.request_id)
    return confirmed


# --- queries for services ----------------------------------------------------------------------------


def stale_shards(session: Session, model_id: str | None = None) -> list[Shard]:
    """Shards that are stale or retraining (a restarted service resumes their retrains)."""
    query = select(Shard).where(Shard.state.in_(("stale", "retraining")))
    if model_id is not None:
        query = query.where(Shard.model_id == model_id)
    return list(session.scalars(query.order_by(Shard.model_id, Shard.index)))


def remaining_samples(session: Session, shard_id: str) -> list[Sample]:
    """The shard's samples that are not erased: what a retrain trains on (sorted by sample id)."""
    return list(
        session.scalars(
            select(Sample)
            .where(Sample.shard_id == shard_id, Sample.erased.is_(False))
            .order_by(Sample.sample_pid)
        )
    )


def live_samples(session: Session, model_id: str, split: str) -> list[Sample]:
    """A split's samples that are not erased (e.g. the validation pool), by pseudonym order."""
    return list(
        session.scalars(
            select(Sample)
            .where(Sample.model_id == model_id, Sample.split == split, Sample.erased.is_(False))
            .order_by(Sample.sample_pid)
        )
    )


def erased_sample_pids(session: Session, model_id: str) -> set[str]:
    """Pseudonyms of the model's erased samples, every split (valid ones leave the neighbour pool)."""
    return set(session.scalars(select(Sample.sample_pid).where(Sample.model_id == model_id, Sample.erased)))


def serving_adapters(session: Session, model_id: str) -> dict[str, AdapterVersion]:
    """shard id -> its serving adapter version, for the shards of a model that are serving."""
    rows = session.scalars(
        select(AdapterVersion)
        .join(Shard, Shard.id == AdapterVersion.shard_id)
        .where(Shard.model_id == model_id, Shard.state == "serving", AdapterVersion.state == "serving")
    )
    return {v.shard_id: v for v in rows}


# --- views (JSON-ready dicts for the API and the CLI) ------------------------------------------------


def _iso(ts: datetime | None) -> str | None:
    return audit.format_ts(ts) if ts is not None else None


def shard_view(shard: Shard, serving: AdapterVersion | None = None) -> dict[str, Any]:
    return {
        "shard_id": shard.id,
        "model_id": shard.model_id,
        "index": shard.index,
        "state": shard.state,
        "generation": shard.generation,
        "retrain_generation": shard.retrain_generation,
        "serving_version": serving.version if serving else None,
        "updated_at": _iso(shard.updated_at),
    }


def adapter_view(adapter: AdapterVersion) -> dict[str, Any]:
    return {
        "id": adapter.id,
        "shard_id": adapter.shard_id,
        "version": adapter.version,
        "state": adapter.state,
        "artifact_uri": adapter.artifact_uri,
        "adapter_sha256": adapter.adapter_sha256,
        "manifest_digest": adapter.manifest_digest,
        "sample_digest": adapter.sample_digest,
        "num_samples": adapter.num_samples,
        "started_generation": adapter.started_generation,
        "trained_at": _iso(adapter.trained_at),
        "registered_at": _iso(adapter.registered_at),
        "promoted_at": _iso(adapter.promoted_at),
        "excluded_at": _iso(adapter.excluded_at),
        "retired_at": _iso(adapter.retired_at),
    }


def _version_ref(session: Session, version_id: int | None) -> dict[str, Any] | None:
    if version_id is None:
        return None
    adapter = session.get(AdapterVersion, version_id)
    if adapter is None:  # pragma: no cover - foreign key
        return None
    return {
        "id": adapter.id,
        "shard_id": adapter.shard_id,
        "version": adapter.version,
        "state": adapter.state,
    }


def request_view(
    session: Session,
    request: ErasureRequest,
    *,
    replica_live_seconds: float = DEFAULT_REPLICA_LIVE_SECONDS,
    now: datetime | None = None,
) -> dict[str, Any]:
    """A request with its timestamps, where its exclusion stands on the live replicas (`replicas`,
    `ReplicaConfirmation.view`) and, per affected shard, the excluded and retrained versions."""
    replicas = replica_confirmation(session, request, now=now, live_seconds=replica_live_seconds)
    links = session.scalars(
        select(ErasureRequestShard)
        .where(ErasureRequestShard.request_id == request.request_id)
        .order_by(ErasureRequestShard.shard_id)
    )
    return {
        "request_id": request.request_id,
        "user_pid": request.user_pid,
        "scope": request.scope,
        "interaction_pids": request.interaction_pids,
        "status": request.status,
        "samples_erased": request.samples_erased,
        "outcome": request.outcome,
        "no_data_held": request.outcome == "no_data_held",
        "requested_at": _iso(request.requested_at),
        "due_at": _iso(request.due_at),
        "overdue": request.completed_at is None and request.due_at is not None and request.due_at < utcnow(),
        "received_at": _iso(request.received_at),
        "excluded_at": _iso(request.excluded_at),
        "retraining_at": _iso(request.retraining_at),
        "completed_at": _iso(request.completed_at),
        "replicas_confirmed_at": _iso(request.replicas_confirmed_at),
        "replicas": replicas.view(),
        "shards": [
            {
                "shard_id": link.shard_id,
                "excluded_version": _version_ref(session, link.excluded_version_id),
                "retrained_version": _version_ref(session, link.retrained_version_id),
                "retrained_at": _iso(link.retrained_at),
            }
            for link in links
        ],
    }


def erasure_status(
    session: Session, request_id: str, *, replica_live_seconds: float = DEFAULT_REPLICA_LIVE_SECONDS
) -> dict[str, Any]:
    """A request's status and the timeline of its audit events; NotFoundError if unknown."""
    request = session.get(ErasureRequest, request_id)
    if request is None:
        raise NotFoundError(f"erasure request {request_id!r}")
    view = request_view(session, request, replica_live_seconds=replica_live_seconds)
    view["timeline"] = [audit.row_view(r) for r in audit.rows_for(session, request_ids=[request_id])]
    return view


def user_erasure_status(
    session: Session,
    user_id: str,
    pseudonymizer: Pseudonymizer,
    *,
    replica_live_seconds: float = DEFAULT_REPLICA_LIVE_SECONDS,
) -> dict[str, Any]:
    """For a compliance officer: is the user erased, when was their data excluded from serving,
    when was every affected shard retrained, which adapter versions were involved. The user is
    found by pseudonym; only this user's requests and audit rows are read. NotFoundError if the
    registry never heard of them."""
    user_pid = pseudonymizer.user(user_id)
    user = session.get(User, user_pid)
    requests = list(
        session.scalars(
            select(ErasureRequest)
            .where(ErasureRequest.user_pid == user_pid)
            .order_by(ErasureRequest.received_at)
        )
    )
    if user is None and not requests:
        raise NotFoundError(f"user {user_id!r}")
    now = utcnow()
    views = [request_view(session, r, replica_live_seconds=replica_live_seconds, now=now) for r in requests]
    held = session.execute(select(Sample.split, Sample.erased).where(Sample.user_pid == user_pid))
    counts = {"held": 0, "erased": 0}
    for _split, erased in held:
        counts["erased" if erased else "held"] += 1
    all_excluded = bool(requests) and all(r.excluded_at is not None for r in requests)
    all_completed = bool(requests) and all(r.completed_at is not None for r in requests)
    all_confirmed = bool(requests) and all(r.replicas_confirmed_at is not None for r in requests)
    excluded_versions = {
        s["excluded_version"]["id"]: s["excluded_version"]
        for v in views
        for s in v["shards"]
        if s["excluded_version"]
    }
    retrained_versions = {
        s["retrained_version"]["id"]: s["retrained_version"]
        for v in views
        for s in v["shards"]
        if s["retrained_version"]
    }
    return {
        "user_id": user_id,
        "user_pid": user_pid,
        "erased": user is not None and user.erased_at is not None,
        "erased_at": _iso(user.erased_at) if user else None,
        "samples_held": counts["held"],
        "samples_erased": counts["erased"],
        "no_data_held": bool(requests) and all(r.outcome == "no_data_held" for r in requests),
        "excluded_from_serving_at": _iso(max(r.excluded_at for r in requests if r.excluded_at))
        if all_excluded
        else None,
        "replicas_confirmed_at": _iso(
            max(r.replicas_confirmed_at for r in requests if r.replicas_confirmed_at)
        )
        if all_confirmed
        else None,
        "replicas_state": _overall_replica_state([v["replicas"]["state"] for v in views]),
        "all_shards_retrained_at": _iso(max(r.completed_at for r in requests if r.completed_at))
        if all_completed
        else None,
        "adapter_versions": {
            "excluded": [excluded_versions[k] for k in sorted(excluded_versions)],
            "retrained": [retrained_versions[k] for k in sorted(retrained_versions)],
        },
        "requests": views,
        "timeline": [audit.row_view(r) for r in audit.rows_for(session, user_pid=user_pid)],
    }


def _overall_replica_state(states: Sequence[str]) -> str | None:
    """The user's replica state over their requests: the least advanced one (None without requests)."""
    if not states:
        return None
    return min(states, key=lambda state: ("no_live_replica", "waiting", "confirmed").index(state))
