"""Fixtures and helpers for the registry tests: migrated SQLite and Postgres databases, and a small
fake model directory (docs/ARCHITECTURE.md §4) with 3 users, 10 samples and 2 shards.

Import the fixtures you use into a test module (`from db_fixtures import sqlite_engine  # noqa: F401`).
Postgres tests need the server on 127.0.0.1:5432; when it is unreachable they FAIL, unless
APA_SKIP_POSTGRES=1 is set.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from apa.artifacts import ArtifactStore
from apa.backbone import BackboneConfig
from apa.data import Sample
from apa.db.session import make_engine, upgrade
from apa.modeldir import ModelDir, ModelInfo, ShardManifest
from apa.partition import Partition, PartitionConfig
from apa.prompts import MOVIE_INSTRUCTION, answer_text
from apa.pseudonyms import Pseudonymizer
from apa.training import TrainConfig

PG_SERVER = os.environ.get("APA_TEST_POSTGRES", "postgresql+psycopg2://postgres@127.0.0.1:5432")
"""Server the integration tests create their throwaway databases on."""

MODEL_ID = "fake-model"
PSEUDO = Pseudonymizer.from_secret(os.environ["APA_PSEUDONYM_KEY"], source="tests")
"""The tests' pseudonym key (conftest sets APA_PSEUDONYM_KEY for the whole test session)."""

# Interaction ids are "<user>:<item>"; each sample holds 2 history interactions and the target last.
SAMPLES: dict[str, list[tuple[str, str, list[str]]]] = {
    "train": [
        ("t-a1", "alice", ["alice:1", "alice:2", "alice:3"]),
        ("t-a2", "alice", ["alice:2", "alice:3", "alice:4"]),
        ("t-b1", "bob", ["bob:1", "bob:2", "bob:3"]),
        ("t-b2", "bob", ["bob:2", "bob:3", "bob:4"]),
        ("t-c1", "carol", ["carol:1", "carol:2", "carol:3"]),
        ("t-c2", "carol", ["carol:2", "carol:3", "carol:4"]),
    ],
    "valid": [
        ("v-a1", "alice", ["alice:3", "alice:4", "alice:5"]),
        ("v-b1", "bob", ["bob:3", "bob:4", "bob:5"]),
    ],
    "test": [
        ("s-a1", "alice", ["alice:4", "alice:5", "alice:6"]),
        ("s-c1", "carol", ["carol:3", "carol:4", "carol:5"]),
    ],
}
PARTITION = [["t-a1", "t-b1", "t-c1"], ["t-a2", "t-b2", "t-c2"]]
"""Shard 0 and shard 1 of the fake model: every user has one train sample in each."""


def shard_id(k: int) -> str:
    return f"{MODEL_ID}/{k}"


def pid(sample_id: str) -> str:
    """The pseudonym of a sample id under the tests' key."""
    return PSEUDO.sample(sample_id)


def fake_samples() -> dict[str, list[Sample]]:
    out: dict[str, list[Sample]] = {}
    for split, rows in SAMPLES.items():
        out[split] = [
            Sample(
                sample_id=sample_id,
                user_id=user,
                split=split,  # type: ignore[arg-type]
                instruction=MOVIE_INSTRUCTION,
                input=f"User Preference: {interactions[:-1]}\nWhether the user will like {interactions[-1]}?",
                output=answer_text(1),
                label=1,
                interaction_ids=tuple(interactions),
            )
            for sample_id, user, interactions in rows
        ]
    return out


def make_manifest(
    k: int, sample_ids: list[str], *, version: int = 1, adapter_sha256: str | None = None
) -> dict[str, Any]:
    """A manifest as training writes it (`ShardManifest.to_json`), naming samples by pseudonym."""
    ids = sorted(sample_ids)
    sha = adapter_sha256 or (hashlib.sha256(f"{k}-{version}-{ids}".encode()).hexdigest() if ids else None)
    return ShardManifest(
        shard_index=k,
        version=version,
        sample_pids=tuple(pid(i) for i in ids),
        train_config=TrainConfig(lora_r=2, lora_alpha=4),
        base_model="tiny-llama",
        base_model_digest="0" * 64,
        pseudonym_key_id=PSEUDO.key_id,
        adapter_sha256=sha,
        trained_at="2025-11-28T00:00:00+00:00",
        train_seconds=1.5,
    ).to_json()


def write_fake_model_dir(root: Path, *, with_adapters: bool = True) -> Path:
    """A model directory with 10 samples (3 users, 3 splits), 2 shards and real safetensors files
    (tiny fake LoRA tensors: enough for the registry, not for a model)."""
    import torch

    info = ModelInfo(
        base_model="tiny-llama",
        base_model_digest="0" * 64,
        backbone_config=BackboneConfig(model="tiny"),
        partition_config=PartitionConfig(strategy="random", num_shards=len(PARTITION)),
        train_config=TrainConfig(lora_r=2, lora_alpha=4),
        num_shards=len(PARTITION),
        pseudonym_key_id=PSEUDO.key_id,
        created_at="2025-11-28T00:00:00+00:00",
    )
    parts = Partition(shards=[list(s) for s in PARTITION], centroids=None, config=info.partition_config)
    md = ModelDir.create(root, info, fake_samples(), parts)
    if with_adapters:
        for k, ids in enumerate(PARTITION):
            manifest = ShardManifest.from_json(make_manifest(k, ids, adapter_sha256="0" * 64))
            weights = {"lora_A": torch.full((2, 4), float(k)), "lora_B": torch.zeros(4, 2)}
            md.save_shard(replace(manifest, adapter_sha256=None), weights, {"r": 2, "peft_type": "LORA"})
    return root


@pytest.fixture(scope="session")
def fake_model_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_model_dir(tmp_path_factory.mktemp("models") / MODEL_ID)


@pytest.fixture()
def store(tmp_path: Path) -> ArtifactStore:
    """An empty artifact store."""
    return ArtifactStore(tmp_path / "artifacts")


@pytest.fixture()
def model_dir(fake_model_template: Path, tmp_path: Path) -> Path:
    """A fresh copy of the fake model directory (tests may edit it)."""
    import shutil

    return Path(shutil.copytree(fake_model_template, tmp_path / MODEL_ID))


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


@pytest.fixture(scope="session")
def migrated_sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated to head once per session; tests get copies."""
    path = tmp_path_factory.mktemp("sqlite") / "template.db"
    engine = make_engine(sqlite_url(path))
    upgrade(engine)
    engine.dispose()
    return path


def sqlite_copy(template: Path, path: Path) -> Engine:
    """An engine on a copy of the SQLite database `template` (throwaway: no fsync)."""
    import shutil

    shutil.copyfile(template, path)
    engine = make_engine(sqlite_url(path))

    @event.listens_for(engine, "connect")
    def _fast(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute("PRAGMA synchronous = OFF")

    return engine


@pytest.fixture()
def sqlite_engine(migrated_sqlite_template: Path, tmp_path: Path) -> Iterator[Engine]:
    """A fresh SQLite file database at the newest migration."""
    engine = sqlite_copy(migrated_sqlite_template, tmp_path / "registry.db")
    yield engine
    engine.dispose()


def _admin_engine() -> Engine:
    if os.environ.get("APA_SKIP_POSTGRES") == "1":
        pytest.skip("APA_SKIP_POSTGRES=1: Postgres integration tests skipped on request")
    engine = create_engine(f"{PG_SERVER}/postgres", isolation_level="AUTOCOMMIT")
    try:
        with engine.connect():
            pass
    except OperationalError as exc:
        engine.dispose()
        pytest.fail(
            f"Postgres is unreachable at {PG_SERVER} ({exc.orig}); start it, or set APA_SKIP_POSTGRES=1 "
            "to skip the integration tests",
            pytrace=False,
        )
    return engine


@pytest.fixture()
def pg_url() -> Iterator[str]:
    """URL of a fresh, empty Postgres database, dropped afterwards."""
    admin = _admin_engine()
    name = f"apa_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{PG_SERVER}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture()
def pg_engine(pg_url: str) -> Iterator[Engine]:
    """A fresh Postgres database migrated to head."""
    engine = make_engine(pg_url)
    upgrade(engine)
    yield engine
    engine.dispose()


def disable_append_only_guard(engine: Engine) -> None:
    """Switch off the database's guards of the audit tables (append-only audit_log and
    audit_anchors, the audit_head guard), as an attacker with DDL rights would. The trigger that
    moves the head on INSERT stays, so the code can still append."""
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            for table, trigger in (
                ("audit_log", "audit_log_append_only"),
                ("audit_log", "audit_log_no_truncate"),
                ("audit_head", "audit_head_guard"),
                ("audit_head", "audit_head_no_truncate"),
                ("audit_anchors", "audit_anchors_append_only"),
                ("audit_anchors", "audit_anchors_no_truncate"),
            ):
                conn.execute(text(f"ALTER TABLE {table} DISABLE TRIGGER {trigger}"))
        else:
            for trigger in (
                "audit_log_no_update",
                "audit_log_no_delete",
                "audit_head_guard_update",
                "audit_head_no_delete",
                "audit_head_no_insert",
                "audit_anchors_no_update",
                "audit_anchors_no_delete",
            ):
                conn.execute(text(f"DROP TRIGGER IF EXISTS {trigger}"))
