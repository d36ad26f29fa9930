"""Registry transitions (docs/ARCHITECTURE.md §5): bootstrap, erasure, retraining, promotion, replicas.

Unit tests run on SQLite; the `integration` ones repeat the life cycle on the real Postgres."""

# ruff: noqa: F811 - pytest fixtures imported from db_fixtures are redefined as test arguments

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from apa.artifacts import ArtifactStore
from apa.db import audit, registry
from apa.db.bootstrap import BootstrapError, bootstrap, bootstrap_command
from apa.db.models import (
    AdapterVersion,
    AuditLog,
    ErasureRequest,
    Interaction,
    Sample,
    Shard,
    User,
    utcnow,
)
from apa.db.session import session_scope
from apa.events import ErasureRequested
from db_fixtures import (  # noqa: F401 - fixtures
    MODEL_ID,
    PARTITION,
    PSEUDO,
    SAMPLES,
    fake_model_template,
    make_manifest,
    migrated_sqlite_template,
    model_dir,
    pg_engine,
    pg_url,
    pid,
    shard_id,
    sqlite_engine,
    store,
)

CLEAR = {pid(sample_id): sample_id for rows in SAMPLES.values() for sample_id, _, _ in rows}
"""Sample pseudonym -> the fake model's clear sample id."""


def _erase(engine: Engine, user: str, interactions: list[str] | None = None, request_id: str = "req-1"):
    with session_scope(engine) as session:
        result = registry.record_erasure(session, ErasureRequested(request_id, user, interactions), PSEUDO)
        return result


def _samples(session: Session) -> dict[str, Sample]:
    """Registry sample rows by clear sample id (the test knows the ids; the registry does not)."""
    return {CLEAR[s.sample_pid]: s for s in session.scalars(select(Sample))}


def _erased_ids(result: registry.ErasureResult) -> list[str]:
    return sorted(CLEAR[key.split("/", 1)[1]] for key in result.erased_samples)


def _retrain(session: Session, k: int, *, version: int = 2) -> AdapterVersion:
    """What a trainer does: mark retraining, train on the remaining samples, register."""
    generation = registry.mark_retraining(session, shard_id(k))
    remaining = [CLEAR[s.sample_pid] for s in registry.remaining_samples(session, shard_id(k))]
    return registry.register_adapter_version(
        session,
        shard_id(k),
        make_manifest(k, remaining, version=version),
        f"file:///a/{k}/{version}",
        started_generation=generation,
    )


@pytest.fixture()
def loaded(sqlite_engine: Engine, model_dir: Path, store: ArtifactStore) -> Engine:
    """The fake model bootstrapped into a fresh SQLite registry."""
    with session_scope(sqlite_engine) as session:
        bootstrap(session, model_dir, PSEUDO, store, model_id=MODEL_ID)
    return sqlite_engine


# --- bootstrap ---------------------------------------------------------------------------------------


def test_bootstrap_loads_samples_with_shards_and_serving_adapters(
    loaded: Engine, store: ArtifactStore
) -> None:
    with Session(loaded) as session:
        samples = _samples(session)
        assert len(samples) == 10
        assert {s.shard_id for s in samples.values() if s.split == "train"} == {shard_id(0), shard_id(1)}
        assert all(s.shard_id is None for s in samples.values() if s.split != "train")
        for k, ids in enumerate(PARTITION):
            assert {sid for sid, s in samples.items() if s.shard_id == shard_id(k)} == set(ids)
        assert samples["t-a1"].text is not None and json.loads(samples["t-a1"].text)["user_id"] == "alice"
        assert samples["t-a1"].user_pid == PSEUDO.user("alice")
        assert samples["t-a1"].content_hmac == PSEUDO.content(samples["t-a1"].text)
        roles = {
            (i.interaction_pid, i.role)
            for i in session.scalars(select(Interaction).where(Interaction.sample_pk == samples["t-a1"].id))
        }
        assert roles == {
            (PSEUDO.interaction("alice:1"), "history"),
            (PSEUDO.interaction("alice:2"), "history"),
            (PSEUDO.interaction("alice:3"), "target"),
        }
        shards = session.scalars(select(Shard).order_by(Shard.index)).all()
        assert [(s.id, s.state, s.generation) for s in shards] == [
            (shard_id(0), "serving", 0),
            (shard_id(1), "serving", 0),
        ]
        versions = session.scalars(select(AdapterVersion).order_by(AdapterVersion.shard_id)).all()
        assert [(v.shard_id, v.version, v.state) for v in versions] == [
            (shard_id(0), 1, "serving"),
            (shard_id(1), 1, "serving"),
        ]
        assert versions[0].manifest["sample_pids"] == sorted(pid(i) for i in PARTITION[0])
        assert versions[0].artifact_uri == f"{MODEL_ID}/0/v1-{versions[0].adapter_sha256}"
        assert store.exists(versions[0].artifact_uri) and store.exists(versions[1].artifact_uri)
        assert session.scalar(select(func.count()).select_from(User)) == 3
        assert audit.verify(session).ok


def test_bootstrap_is_idempotent(loaded: Engine, model_dir: Path, store: ArtifactStore) -> None:
    def counts() -> tuple[int, ...]:
        with Session(loaded) as session:
            return tuple(
                session.scalar(select(func.count()).select_from(t)) or 0
                for t in (Sample, Interaction, Shard, AdapterVersion, AuditLog, User)
            )

    before = counts()
    with session_scope(loaded) as session:
        result = bootstrap(session, model_dir, PSEUDO, store, model_id=MODEL_ID)
    assert (result.samples_added, result.shards_added, result.adapters_registered) == (0, 0, [])
    assert result.adapters_already_registered == 2
    assert counts() == before


def test_bootstrap_after_erasure_does_not_bring_erased_data_back(
    loaded: Engine, model_dir: Path, store: ArtifactStore
) -> None:
    _erase(loaded, "alice")
    with session_scope(loaded) as session:
        bootstrap(session, model_dir, PSEUDO, store, model_id=MODEL_ID)
    with Session(loaded) as session:
        samples = _samples(session)
        assert samples["t-a1"].erased and samples["t-a1"].text is None
        assert session.get(Shard, shard_id(0)).state == "stale"  # type: ignore[union-attr]
        assert audit.verify(session).ok


def test_bootstrap_refuses_adapter_whose_sha256_differs_from_manifest(
    sqlite_engine: Engine, model_dir: Path, store: ArtifactStore
) -> None:
    weights = model_dir / "shards" / "1" / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes() + b"tampered")
    with pytest.raises(BootstrapError, match="sha256"), session_scope(sqlite_engine) as session:
        bootstrap(session, model_dir, PSEUDO, store)
    with Session(sqlite_engine) as session:
        assert session.scalar(select(func.count()).select_from(Sample)) == 0  # nothing half-imported


def test_bootstrap_command_reports_errors_and_exits_nonzero(
    sqlite_engine: Engine,
    model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("APA_ARTIFACT_STORE", str(tmp_path / "store"))
    url = sqlite_engine.url.render_as_string(hide_password=False)
    assert bootstrap_command(str(model_dir), url=url) == 0
    assert bootstrap_command(str(model_dir), url=url) == 0  # idempotent
    (model_dir / "partition.json").write_text("{not json")
    assert bootstrap_command(str(model_dir), url=url) == 1
    assert "partition.json" in capsys.readouterr().err


def test_bootstrap_refuses_new_data_of_an_erased_user(
    loaded: Engine, tmp_path: Path, model_dir: Path, store: ArtifactStore
) -> None:
    _erase(loaded, "bob")
    with pytest.raises(BootstrapError, match="erased user"), session_scope(loaded) as session:
        bootstrap(session, model_dir, PSEUDO, store, model_id="another-model")


def test_bootstrap_refuses_a_model_dir_pseudonymised_under_another_key(
    loaded: Engine, tmp_path: Path, store: ArtifactStore
) -> None:
    from apa.pseudonyms import Pseudonymizer
    from db_fixtures import write_fake_model_dir

    other = Pseudonymizer(b"another-key-of-32-bytes-xxxxxxxx")
    with pytest.raises(BootstrapError, match="pseudonym key"), session_scope(loaded) as session:
        bootstrap(session, write_fake_model_dir(tmp_path / "m2"), other, store, model_id="m2")


# --- erasure -----------------------------------------------------------------------------------------


def test_erased_user_samples_leave_every_split_and_keep_their_digest(loaded: Engine) -> None:
    with Session(loaded) as session:
        digests = {sid: s.content_hmac for sid, s in _samples(session).items()}
    result = _erase(loaded, "alice")
    assert _erased_ids(result) == sorted(["t-a1", "t-a2", "v-a1", "s-a1"])
    with Session(loaded) as session:
        for sid, sample in _samples(session).items():
            assert sample.erased == (sample.user_pid == PSEUDO.user("alice")), sid
            assert (sample.text is None) == sample.erased
            assert (sample.label is None) == sample.erased and (
                sample.interaction_pids is None
            ) == sample.erased
            assert sample.content_hmac == digests[sid]
            if sample.erased:
                assert sample.erased_at is not None and sample.erasure_request_id == "req-1"
                assert not session.scalars(
                    select(Interaction).where(Interaction.sample_pk == sample.id)
                ).all()
        assert session.get(User, PSEUDO.user("alice")).erased_at is not None  # type: ignore[union-attr]
        assert registry.erased_sample_pids(session, MODEL_ID) == {
            pid(i) for i in ("t-a1", "t-a2", "v-a1", "s-a1")
        }


def test_erasure_marks_train_shards_stale_and_excludes_their_adapters(loaded: Engine) -> None:
    result = _erase(loaded, "bob", ["bob:1"])  # only in t-b1 (shard 0)
    assert result.stale_shards == [shard_id(0)]
    assert result.request.status == "excluded"
    with Session(loaded) as session:
        s0, s1 = session.get(Shard, shard_id(0)), session.get(Shard, shard_id(1))
        assert (s0.state, s0.generation) == ("stale", 1)  # type: ignore[union-attr]
        assert (s1.state, s1.generation) == ("serving", 0)  # type: ignore[union-attr]
        states = {v.shard_id: v.state for v in session.scalars(select(AdapterVersion))}
        assert states == {shard_id(0): "excluded", shard_id(1): "serving"}
        assert set(registry.serving_adapters(session, MODEL_ID)) == {shard_id(1)}
        assert [s.id for s in registry.stale_shards(session)] == [shard_id(0)]
        assert audit.verify(session).ok


def test_interaction_erasure_finds_samples_holding_it_in_history(loaded: Engine) -> None:
    # alice:3 is the target of t-a1 and in the history of t-a2 and v-a1; not in s-a1.
    result = _erase(loaded, "alice", ["alice:3"])
    assert _erased_ids(result) == ["t-a1", "t-a2", "v-a1"]
    assert result.stale_shards == [shard_id(0), shard_id(1)]
    with Session(loaded) as session:
        samples = _samples(session)
        assert not samples["s-a1"].erased
        assert session.get(User, PSEUDO.user("alice")).erased_at is None  # type: ignore[union-attr]


def test_interaction_erasure_never_reaches_another_users_samples(loaded: Engine) -> None:
    result = _erase(loaded, "alice", ["bob:1", "carol:2"])
    assert result.erased_samples == [] and result.stale_shards == []
    assert result.request.status == "completed"
    with Session(loaded) as session:
        assert not any(s.erased for s in _samples(session).values())


def test_second_delivery_of_same_request_is_a_no_op(loaded: Engine) -> None:
    first = _erase(loaded, "carol")
    with Session(loaded) as session:
        rows_before = session.scalar(select(func.count()).select_from(AuditLog))
        generations = {s.id: s.generation for s in session.scalars(select(Shard))}
    second = _erase(loaded, "carol")
    assert first.created and not second.created
    assert second.erased_samples == [] and second.stale_shards == []
    assert second.request.request_id == first.request.request_id
    with Session(loaded) as session:
        assert session.scalar(select(func.count()).select_from(AuditLog)) == rows_before
        assert {s.id: s.generation for s in session.scalars(select(Shard))} == generations
        assert session.scalar(select(func.count()).select_from(ErasureRequest)) == 1


def test_long_lived_session_sees_erasures_committed_by_other_writers(loaded: Engine) -> None:
    from apa.db.session import make_sessionmaker

    with make_sessionmaker(loaded)() as consumer:  # e.g. an erasure consumer keeping its session
        with consumer.begin():
            cached = _samples(consumer)  # held: stays in the session's identity map
            assert not any(s.erased for s in cached.values())
        _erase(loaded, "alice", request_id="other-writer")
        with consumer.begin():
            result = registry.record_erasure(consumer, ErasureRequested("req-2", "alice"), PSEUDO)
        assert result.erased_samples == [] and result.stale_shards == []
        assert cached["t-a1"].erased
    with Session(loaded) as session:
        assert {s.id: s.generation for s in session.scalars(select(Shard))} == {
            shard_id(0): 1,
            shard_id(1): 1,
        }


def test_reused_request_id_for_another_user_is_a_conflict(loaded: Engine) -> None:
    _erase(loaded, "carol")
    with pytest.raises(registry.ConflictError):
        _erase(loaded, "bob")
    with Session(loaded) as session:
        assert not any(s.erased for s in _samples(session).values() if s.user_pid == PSEUDO.user("bob"))


def test_erasure_of_user_without_train_samples_completes_at_once(loaded: Engine) -> None:
    result = _erase(loaded, "alice", ["alice:6"])  # only in test sample s-a1
    assert _erased_ids(result) == ["s-a1"] and result.stale_shards == []
    assert result.request.status == "completed" and result.request.completed_at is not None


def test_erasure_of_unknown_user_is_recorded_and_completed(loaded: Engine) -> None:
    result = _erase(loaded, "nobody")
    assert result.request.status == "completed" and result.request.samples_erased == 0


# --- retraining and promotion ------------------------------------------------------------------------


def test_retrain_promotion_completes_request_when_all_shards_serve_again(loaded: Engine) -> None:
    _erase(loaded, "alice")
    with session_scope(loaded) as session:
        v0 = _retrain(session, 0)
        assert v0.state == "serving" and pid("t-a1") not in v0.manifest["sample_pids"]
        request = session.get(ErasureRequest, "req-1")
        assert request is not None and request.status == "retraining" and request.completed_at is None
    with session_scope(loaded) as session:
        _retrain(session, 1)
    with Session(loaded) as session:
        status = registry.erasure_status(session, "req-1")
        assert status["status"] == "completed"
        assert (
            status["received_at"]
            <= status["excluded_at"]
            <= status["retraining_at"]
            <= status["completed_at"]
        )
        assert [
            (s["excluded_version"]["version"], s["retrained_version"]["version"]) for s in status["shards"]
        ] == [
            (1, 2),
            (1, 2),
        ]
        events = [row["event_type"] for row in status["timeline"]]
        assert events[0] == "erasure_received" and events[-1] == "erasure_completed"
        assert {"samples_erased", "shard_stale", "erasure_excluded", "erasure_retraining"} <= set(events)
        assert {s.state for s in session.scalars(select(Shard))} == {"serving"}
        versions = {(v.shard_id, v.version): v.state for v in session.scalars(select(AdapterVersion))}
        assert versions[(shard_id(0), 1)] == "excluded" and versions[(shard_id(0), 2)] == "serving"
        assert audit.verify(session).ok


def test_promotion_retires_the_previous_serving_version(loaded: Engine) -> None:
    _erase(loaded, "alice")  # shard 0 stale; retrained twice: v2 promoted, then v3 replaces it
    with session_scope(loaded) as session:
        _retrain(session, 0, version=2)
        registry.register_adapter_version(
            session, shard_id(0), make_manifest(0, ["t-b1", "t-c1"], version=3), "file:///a/0/3"
        )
        states = {
            v.version: v.state
            for v in session.scalars(select(AdapterVersion).where(AdapterVersion.shard_id == shard_id(0)))
        }
        assert states == {1: "excluded", 2: "retired", 3: "serving"}


def test_stale_retrain_result_is_not_promoted(loaded: Engine) -> None:
    _erase(loaded, "alice", ["alice:1"], request_id="r1")  # t-a1, shard 0
    with session_scope(loaded) as session:
        generation = registry.mark_retraining(session, shard_id(0))
        remaining = [CLEAR[s.sample_pid] for s in registry.remaining_samples(session, shard_id(0))]
    # a newer erasure hits shard 0 while that retrain runs; the trainer's data excluded it already
    _erase(loaded, "carol", ["carol:1"], request_id="r2")  # t-c1, shard 0
    remaining.remove("t-c1")
    with session_scope(loaded) as session:
        late = registry.register_adapter_version(
            session,
            shard_id(0),
            make_manifest(0, remaining, version=2),
            "file:///late",
            started_generation=generation,
        )
        assert late.state == "stale"
        shard = session.get(Shard, shard_id(0))
        assert shard is not None and shard.state == "stale"
        assert session.get(ErasureRequest, "r1").status != "completed"  # type: ignore[union-attr]
    with session_scope(loaded) as session:
        fresh = _retrain(session, 0, version=3)
        assert fresh.state == "serving"
        assert {r.request_id: r.status for r in session.scalars(select(ErasureRequest))} == {
            "r1": "completed",
            "r2": "completed",
        }
        assert audit.verify(session).ok


def test_shard_emptied_by_erasures_serves_no_adapter_and_completes_requests(loaded: Engine) -> None:
    for user in ("alice", "bob", "carol"):
        _erase(loaded, user, request_id=f"req-{user}")
    with session_scope(loaded) as session:
        for k in (0, 1):
            generation = registry.mark_retraining(session, shard_id(k))
            assert registry.remaining_samples(session, shard_id(k)) == []
            empty = {**make_manifest(k, [], version=2), "adapter_sha256": None}
            version = registry.register_adapter_version(
                session, shard_id(k), empty, f"file:///a/{k}/2", started_generation=generation
            )
            assert version.state == "serving" and version.adapter_sha256 is None and version.num_samples == 0
        assert {r.status for r in session.scalars(select(ErasureRequest))} == {"completed"}
        with pytest.raises(registry.ManifestRejected) as info:
            registry.register_adapter_version(
                session, shard_id(0), {**make_manifest(0, ["t-b1"], version=3), "adapter_sha256": None}, "x"
            )
        assert info.value.field == "manifest" and "adapter_sha256" in str(info.value)
        assert audit.verify(session).ok


def test_register_refuses_manifest_with_erased_sample(loaded: Engine) -> None:
    _erase(loaded, "alice")
    with session_scope(loaded) as session:
        generation = registry.mark_retraining(session, shard_id(0))
    with pytest.raises(registry.ManifestRejected) as info, session_scope(loaded) as session:
        registry.register_adapter_version(
            session,
            shard_id(0),
            make_manifest(0, PARTITION[0], version=2),
            "file:///x",
            started_generation=generation,
        )
    assert info.value.field == "sample_pids" and info.value.sample_pids == [pid("t-a1")]
    with Session(loaded) as session:
        assert session.get(Shard, shard_id(0)).state == "retraining"  # type: ignore[union-attr]
        assert session.scalar(select(func.count()).select_from(AdapterVersion)) == 2


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda m: m.update(make_manifest(0, ["t-a2"], version=2)), "sample_pids"),  # shard 1's sample
        (lambda m: m.update(version=0), "manifest"),
        (lambda m: m.update(adapter_sha256="xyz"), "adapter_sha256"),
        (lambda m: m.update(shard_index=1), "shard_index"),
        (lambda m: m.update(sample_digest="0" * 64), "manifest"),
        (lambda m: m.update(pseudonym_key_id="f" * 16), "pseudonym_key_id"),
    ],
)
def test_register_refuses_malformed_or_foreign_manifests(
    loaded: Engine, mutate: Callable[[dict[str, object]], None], field: str
) -> None:
    manifest = make_manifest(0, ["t-b1"], version=2)
    mutate(manifest)
    with pytest.raises(registry.ManifestRejected) as info, session_scope(loaded) as session:
        registry.register_adapter_version(session, shard_id(0), manifest, "file:///x")
    assert info.value.field == field


def test_registering_same_manifest_twice_returns_existing_version(loaded: Engine) -> None:
    manifest = make_manifest(1, ["t-b2"], version=2)
    with session_scope(loaded) as session:
        first = registry.register_adapter_version(session, shard_id(1), manifest, "file:///x")
    with session_scope(loaded) as session:
        again = registry.register_adapter_version(session, shard_id(1), manifest, "file:///x")
        assert again.id == first.id
        with pytest.raises(registry.ConflictError):
            registry.register_adapter_version(
                session, shard_id(1), make_manifest(1, ["t-c2"], version=2), "file:///y"
            )


def test_mark_retraining_refuses_a_serving_shard(loaded: Engine) -> None:
    with pytest.raises(registry.ConflictError), session_scope(loaded) as session:
        registry.mark_retraining(session, shard_id(0))
    with pytest.raises(registry.NotFoundError), session_scope(loaded) as session:
        registry.mark_retraining(session, "no/such")


# --- replicas ----------------------------------------------------------------------------------------


def test_replicas_confirm_exclusion_once_none_has_an_excluded_adapter_loaded(loaded: Engine) -> None:
    t0 = utcnow()
    with session_scope(loaded) as session:
        registry.record_replica_heartbeat(session, "replica-a", {shard_id(0): 1, shard_id(1): 1}, now=t0)
        registry.record_replica_heartbeat(session, "replica-b", {shard_id(0): 1}, now=t0)
    with session_scope(loaded) as session:
        registry.record_erasure(
            session, ErasureRequested("r1", "bob", ["bob:1"]), PSEUDO, now=t0 + timedelta(seconds=1)
        )
    with session_scope(loaded) as session:
        registry.record_replica_heartbeat(
            session, "replica-a", {shard_id(1): 1}, now=t0 + timedelta(seconds=2)
        )
        assert session.get(ErasureRequest, "r1").replicas_confirmed_at is None  # type: ignore[union-attr]
    with session_scope(loaded) as session:
        # replica-b never drops shard 0 but stops heartbeating: after the live window it no longer counts
        later = t0 + timedelta(seconds=120)
        registry.record_replica_heartbeat(session, "replica-a", {shard_id(1): 1}, now=later, live_seconds=60)
        request = session.get(ErasureRequest, "r1")
        assert request is not None and request.replicas_confirmed_at == later
        rows = audit.rows_for(session, request_ids=["r1"])
        assert rows[-1].event_type == "replicas_confirmed"
        assert rows[-1].payload["live_replicas"] == ["replica-a"]


def test_heartbeat_without_change_writes_no_audit_row(loaded: Engine) -> None:
    with session_scope(loaded) as session:
        registry.record_replica_heartbeat(session, "r", {shard_id(0): 1})
        n = session.scalar(select(func.count()).select_from(AuditLog))
        registry.record_replica_heartbeat(session, "r", {shard_id(0): 1})
        assert session.scalar(select(func.count()).select_from(AuditLog)) == n
        with pytest.raises(ValueError, match="loaded"):
            registry.record_replica_heartbeat(session, "r", {shard_id(0): "1"})  # type: ignore[dict-item]


# --- the same on Postgres ----------------------------------------------------------------------------


@pytest.mark.integration
def test_erasure_life_cycle_on_postgres(pg_engine: Engine, model_dir: Path, store: ArtifactStore) -> None:
    with session_scope(pg_engine) as session:
        bootstrap(session, model_dir, PSEUDO, store, model_id=MODEL_ID)
    _erase(pg_engine, "alice", ["alice:3"])
    _erase(pg_engine, "alice", ["alice:3"])  # redelivery
    with session_scope(pg_engine) as session:
        _retrain(session, 0)
        _retrain(session, 1)
    with Session(pg_engine) as session:
        status = registry.user_erasure_status(session, "alice", PSEUDO)
        assert status["requests"][0]["status"] == "completed"
        assert status["samples_erased"] == 3 and status["samples_held"] == 1
        assert len(status["adapter_versions"]["retrained"]) == 2
        result = audit.verify(session)
        assert result.ok, result.summary()


@pytest.mark.integration
def test_concurrent_writers_do_not_fork_the_audit_chain_on_postgres(
    pg_engine: Engine, model_dir: Path, store: ArtifactStore
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with session_scope(pg_engine) as session:
        bootstrap(session, model_dir, PSEUDO, store, model_id=MODEL_ID)

    def heartbeat(i: int) -> None:
        with session_scope(pg_engine) as session:
            registry.record_replica_heartbeat(session, f"replica-{i % 4}", {shard_id(0): 1, "n": i})

    def erase(i: int) -> None:
        _erase(pg_engine, ["alice", "bob", "carol"][i % 3], request_id=f"req-{i % 5}")

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda i: heartbeat(i) if i % 2 else _swallow_conflict(erase, i), range(40)))
    with Session(pg_engine) as session:
        ids = list(session.scalars(select(AuditLog.id).order_by(AuditLog.id)))
        assert ids == list(range(1, len(ids) + 1))
        result = audit.verify(session)
        assert result.ok, result.summary()


def _swallow_conflict(fn: Callable[[int], None], i: int) -> None:
    try:
        fn(i)
    except registry.ConflictError:
        pass


# --- CLI ---------------------------------------------------------------------------------------------


def test_apa_erase_records_the_request_and_prints_its_status(
    loaded: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    from apa.cli import main

    url = loaded.url.render_as_string(hide_password=False)
    assert (
        main(
            ["erase", "--user_id", "bob", "--interactions", "[bob:4]", "--request_id", "cli-1", "--url", url]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["status"] == "excluded" and printed["created"] is True
    assert printed["stale_shards"] == [shard_id(1)] and printed["samples_erased"] == 2  # t-b2, v-b1
    assert main(["erase", "--user_id", "carol", "--request_id", "cli-1", "--url", url]) == 1  # id reused
    assert "already recorded" in capsys.readouterr().err
    assert main(["erase", "--url", url]) == 2
    assert main(["audit", "verify", "--url", url]) == 0
