"""The erasure life cycle against the registry (apa.lifecycle) on a real tiny model: the stale shard
is retrained from the registry's remainder, stored, promoted, and afterwards nothing anywhere — the
database dump (SQLite and Postgres), the model directory, the artifact store — holds the erased
user's ids or records."""

# ruff: noqa: F811 - pytest fixtures imported from db_fixtures are redefined as test arguments

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from apa.aggregation import AggregatedScorer, WeightConfig
from apa.artifacts import ArtifactStore
from apa.data import Sample
from apa.db import audit, registry
from apa.db.bootstrap import bootstrap
from apa.db.models import AdapterVersion, AuditLog, Shard
from apa.db.session import session_scope
from apa.events import ErasureRequested
from apa.lifecycle import ShardRef, handle_erasure, retrain_shard, scrub_model_dirs, serving_refs
from apa.modeldir import ModelDir
from apa.partition import PartitionConfig
from apa.pseudonyms import pseudonymizer_from_settings
from apa.sharded import build_model
from apa.training import TrainConfig
from db_fixtures import (  # noqa: F401 - fixtures
    migrated_sqlite_template,
    pg_engine,
    pg_url,
    sqlite_engine,
)
from dump_helpers import files_holding, traces
from model_fixtures import loadable_tiny_backbone, make_samples

FAST = TrainConfig(
    lr=3e-2, epochs=2, batch_size=4, micro_batch_size=4, patience=3, bf16_autocast=False, lora_dropout=0.0
)
VICTIM = "erase-me-4711"
MODEL_ID = "lifecycle-model"


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    splits = {
        "train": make_samples(24, seed=1, user_prefix="erase-me-471"),
        "valid": make_samples(12, "valid", seed=2, user_prefix="erase-me-471"),
        "test": make_samples(6, "test", seed=3, user_prefix="erase-me-471"),
    }
    root = tmp_path_factory.mktemp("lifecycle") / MODEL_ID
    build_model(
        loadable_tiny_backbone(),
        splits,
        root,
        PartitionConfig(strategy="random", num_shards=3, seed=0),
        FAST,
        pseudonymizer=pseudonymizer_from_settings(),
        progress=False,
    )
    return root


def _victim_traces(template: Path) -> list[str]:
    samples = [s for v in ModelDir(template).splits().values() for s in v if s.user_id == VICTIM]
    records = [s.input for s in samples]  # their prompt texts, as stored in the records
    ids = [VICTIM, *(s.sample_id for s in samples), *(i for s in samples for i in s.interaction_ids)]
    return ids + [
        r for r in records if sum(r in s.input for v in ModelDir(template).splits().values() for s in v) == 1
    ]


def _sqlite_dump(engine: Engine) -> bytes:
    raw = engine.raw_connection()
    try:
        return "\n".join(raw.driver_connection.iterdump()).encode()  # type: ignore[union-attr]
    finally:
        raw.close()


def _pg_dump(url: str) -> bytes:
    plain = url.replace("postgresql+psycopg2://", "postgresql://")
    return subprocess.run(["pg_dump", "--data-only", plain], check=True, capture_output=True).stdout


def _run_life_cycle(engine: Engine, template: Path, tmp_path: Path) -> tuple[ModelDir, ArtifactStore]:
    md = ModelDir(shutil.copytree(template, tmp_path / MODEL_ID))
    store = ArtifactStore(tmp_path / "artifacts")
    p = pseudonymizer_from_settings()
    bb = loadable_tiny_backbone()
    with session_scope(engine) as session:
        bootstrap(session, md.root, p, store, model_id=MODEL_ID)
    with session_scope(engine) as session:
        refs_before = serving_refs(session, MODEL_ID)
        valid = [
            Sample.from_dict(__import__("json").loads(r.text))
            for r in registry.live_samples(session, MODEL_ID, "valid")
        ]
    scorer = AggregatedScorer(
        bb, num_shards=3, source=store, adapters=refs_before, valid=valid, cache_dir=tmp_path / "cache"
    )
    scorer.score(
        [s.prompt for s in md.splits()["test"]], "decomposition", WeightConfig(top_n=3)
    )  # fill caches

    with session_scope(engine) as session:
        outcome = handle_erasure(session, ErasureRequested.create(VICTIM), p)
    assert len(outcome.stale) >= 2 and outcome.samples_erased > 0
    scorer.exclude([shard.index for shard in outcome.stale])
    scorer.forget(user_ids=[VICTIM])
    with session_scope(engine) as session:
        assert scrub_model_dirs(session, p) == [str(md.root.resolve())]

    for shard in sorted(outcome.stale):
        result = retrain_shard(engine, shard, backbone=bb, store=store, pseudonymizer=p)
        assert result is not None and result.promoted and result.deleted_artifacts
        assert not store.exists(refs_before[shard.index].location)  # the tainted weights are gone
    assert retrain_shard(engine, ShardRef(MODEL_ID, 0), backbone=bb, store=store, pseudonymizer=p) is None
    with session_scope(engine) as session:
        refs_after = serving_refs(session, MODEL_ID)
        assert {s.state for s in session.scalars(select(Shard))} == {"serving"}
        assert audit.verify(session).ok
        status = registry.user_erasure_status(session, VICTIM, p)
        assert [r["status"] for r in status["requests"]] == ["completed"]
        erased = registry.erased_sample_pids(session, MODEL_ID)
        for version in session.scalars(select(AdapterVersion).where(AdapterVersion.state == "serving")):
            assert not erased & set(version.manifest["sample_pids"])
        events = [row.event_type for row in session.scalars(select(AuditLog))]
        assert events.count("adapter_artifact_deleted") == len(outcome.stale)
    scorer.sync(refs_after)
    for shard in outcome.stale:
        assert refs_after[shard.index].version == refs_before[shard.index].version + 1
        # the model directory mirrors what serves
        mirrored = md.manifest(shard.index)
        assert mirrored is not None and mirrored.adapter_sha256 == refs_after[shard.index].sha256
    scorer.close()
    return md, store


def test_erasure_life_cycle_leaves_no_trace_of_the_user_on_sqlite(
    sqlite_engine: Engine, template: Path, tmp_path: Path
) -> None:
    _run_life_cycle(sqlite_engine, template, tmp_path)
    needles = _victim_traces(template)
    assert traces(_sqlite_dump(sqlite_engine), needles) == []
    assert files_holding(tmp_path, needles) == {}  # model directory, artifact store, caches
    with Session(sqlite_engine) as session:  # and yet the auditor holding the id finds the request
        status = registry.user_erasure_status(session, VICTIM, pseudonymizer_from_settings())
        assert status["erased"] and status["adapter_versions"]["retrained"]


@pytest.mark.integration
def test_erasure_life_cycle_leaves_no_trace_of_the_user_on_postgres(
    pg_engine: Engine, template: Path, tmp_path: Path
) -> None:
    _run_life_cycle(pg_engine, template, tmp_path)
    needles = _victim_traces(template)
    dump = _pg_dump(pg_engine.url.render_as_string(hide_password=False))
    assert b"COPY public.samples" in dump and traces(dump, needles) == []
    assert files_holding(tmp_path, needles) == {}


def test_the_dump_test_would_see_the_user_before_the_erasure(
    sqlite_engine: Engine, template: Path, tmp_path: Path
) -> None:
    """The detector works: before the erasure, the dump and the files hold the user's data."""
    with session_scope(sqlite_engine) as session:
        bootstrap(
            session, template, pseudonymizer_from_settings(), ArtifactStore(tmp_path / "a"), model_id=MODEL_ID
        )
    needles = _victim_traces(template)
    assert VICTIM in traces(_sqlite_dump(sqlite_engine), needles)
    assert files_holding(template, needles)


def test_a_retrain_overtaken_by_a_newer_erasure_is_not_promoted(
    sqlite_engine: Engine, template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    md = ModelDir(shutil.copytree(template, tmp_path / MODEL_ID))
    store = ArtifactStore(tmp_path / "artifacts")
    p = pseudonymizer_from_settings()
    bb = loadable_tiny_backbone()
    with session_scope(sqlite_engine) as session:
        bootstrap(session, md.root, p, store, model_id=MODEL_ID)
    first, second = [
        s for s in md.splits()["train"] if s.user_id != VICTIM and md.partition().shard_of(s.sample_id) == 0
    ][:2]
    with session_scope(sqlite_engine) as session:
        outcome = handle_erasure(
            session, ErasureRequested.create(first.user_id, [first.target_interaction_id]), p
        )
    shard = ShardRef(MODEL_ID, 0)
    assert shard in outcome.stale
    from apa import training

    original = training.train_adapter

    def train_while_another_erasure_arrives(*args, **kwargs):  # type: ignore[no-untyped-def]
        with session_scope(sqlite_engine) as session:
            handle_erasure(
                session, ErasureRequested.create(second.user_id, [second.target_interaction_id]), p
            )
        return original(*args, **kwargs)

    monkeypatch.setattr(training, "train_adapter", train_while_another_erasure_arrives)
    late = retrain_shard(sqlite_engine, shard, backbone=bb, store=store, pseudonymizer=p)
    monkeypatch.undo()
    assert late is not None and not late.promoted
    assert not store.exists(late.artifact_key)  # trained on data erased meanwhile: deleted, never served
    fresh = retrain_shard(sqlite_engine, shard, backbone=bb, store=store, pseudonymizer=p)
    assert fresh is not None and fresh.promoted and fresh.manifest.version == late.manifest.version + 1
    with Session(sqlite_engine) as session:
        assert audit.verify(session).ok
