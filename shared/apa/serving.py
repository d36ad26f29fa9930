"""An inference replica: the aggregated scorer kept equal to what the registry says may serve.

`Replica` loads the frozen base model once, then exactly the adapter versions the registry lists as
serving (`apa.lifecycle.serving_refs`), read from the artifact store and verified against their
sha256 (`AggregatedScorer.sync`). What serves follows the registry from then on:

* **Exclusion (events).** A thread reads `apa.shard-events` (its own partition assignment, no
  consumer group: every replica sees every event). A `stale` (or `retraining`) event blocks the
  shard at that generation: from the next batch on it gets weight 0, and its adapter is unloaded.
* **Exclusion (safety net).** Every batch first checks a registry snapshot (shard generations and
  states, serving versions, erased-sample count) no older than `registry_max_age_s` (and read afresh
  after any event): a loaded version the registry no longer lists as serving is blocked before the
  batch is scored, even when its event was lost. A snapshot the registry could not refresh for
  `STALE_SNAPSHOT_S` fails the batch closed (503) instead of serving on old knowledge.
* **Erased samples** (the count changed) leave the validation neighbour pool (`scorer.forget`).
* **Every shard stale**: `ServiceUnavailable` (HTTP 503 with the reason), never a stale adapter.
* **Hot reload.** A `serving` event (or a snapshot that lists a version not loaded) wakes a
  background thread: it reads the registry, loads and verifies the new versions while the old set
  keeps serving, and swaps them in atomically between batches (`AggregatedScorer.sync`). A shard
  blocked at generation g is unblocked only by a registry read at generation >= g. Caches are keyed
  by adapter sha256 (the scorer's validation predictions), so nothing computed with a replaced or
  excluded adapter is reused.
* **Heartbeats.** A thread POSTs `{loaded: {shard_id: version}, model_id}` to
  `<registry_url>/replicas/<replica_id>/heartbeat` with the replica token (never the compliance
  token) every `heartbeat_s`, and at once when the loaded set changes; it also touches the liveness
  file.
* **Micro-batching.** Concurrent requests are queued and scored together (one `scorer.score` per
  micro-batch), after waiting at most `batch_wait_s` for more.

>>> replica = Replica(Settings.from_env()).start()
>>> replica.wait_ready(600)
>>> replica.recommend("196", ["242", "302"])
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from apa import liveness
from apa.aggregation.mixture import LEVELS, Level
from apa.aggregation.scorer import AggregatedScorer
from apa.aggregation.weights import WeightConfig
from apa.artifacts import AdapterRef, ArtifactStore
from apa.catalogue import HistoryItem, latest_history, recommend_prompt
from apa.data import Sample as DataSample
from apa.db import registry
from apa.db.models import CatalogueItem, Model, Shard
from apa.db.models import Sample as SampleRow
from apa.db.session import make_engine, session_scope
from apa.events import EventValidationError, ShardEvent
from apa.lifecycle import ShardRef, serving_refs
from apa.prompts import MOVIE_INSTRUCTION
from apa.pseudonyms import pseudonymizer_from_settings
from apa.settings import Settings

if TYPE_CHECKING:
    from apa.backbone import Backbone

log = logging.getLogger("apa.inference")

STALE_SNAPSHOT_S = 30.0
"""A batch fails (503) when the registry could not be read for this long: exclusion is never
decided on older knowledge than this."""
CATALOGUE_RELOAD_S = 5.0
"""An unknown item re-reads the item catalogue at most this often."""
_NEEDS_VALID = ("adaptive", "major")


class ServiceUnavailable(RuntimeError):
    """The replica cannot answer now (still loading, every shard stale, registry unreachable)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UnknownItem(ValueError):
    """An item id the catalogue does not hold; `field` names where it was given."""

    def __init__(self, item_id: str, field: str) -> None:
        super().__init__(f"unknown item {item_id!r}")
        self.item_id = item_id
        self.field = field


@dataclass(frozen=True)
class ServingConfig:
    """How a replica serves (from the `APA_INFERENCE_*` settings)."""

    level: Level = "decomposition"
    """Mixture level (D: decomposition)."""
    weights: WeightConfig = field(default_factory=WeightConfig)
    """Weight strategy ω (adaptive: Eq. 7-8)."""
    registry_max_age_s: float = 1.0
    """Safety net: the oldest registry snapshot a batch may be checked against."""
    batch_wait_s: float = 0.005
    """Longest wait for more requests to join a micro-batch."""
    max_batch: int = 64
    """Most prompts per micro-batch."""
    max_candidates: int = 100
    """Most candidates (or prompts) per request."""
    history_length: int = 10
    """Interactions of a user's history (TALLRec: 10)."""
    heartbeat_s: float = 5.0
    """Seconds between heartbeats."""
    omega: str = "per_candidate"
    """ω of a /recommend: `per_candidate` (each candidate's full prompt embedded: the paper's) or
    `per_request` (one ω from the request prefix, the user's history without a target, shared by its
    candidates: one short embedding pass per request, and the shared prefix tokens run once)."""

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"level must be one of {list(LEVELS)}, got {self.level!r}")
        for name in ("registry_max_age_s", "heartbeat_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.omega not in ("per_candidate", "per_request"):
            raise ValueError(f"omega must be per_candidate or per_request, got {self.omega!r}")
        if self.batch_wait_s < 0:
            raise ValueError(f"batch_wait_s must be >= 0, got {self.batch_wait_s}")
        for name in ("max_batch", "max_candidates", "history_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_settings(cls, settings: Settings) -> ServingConfig:
        return cls(
            level=settings.inference_level,  # type: ignore[arg-type]  # checked in __post_init__
            weights=WeightConfig(strategy=settings.inference_strategy),  # type: ignore[arg-type]
            registry_max_age_s=settings.inference_registry_max_age_s,
            batch_wait_s=settings.inference_batch_wait_ms / 1000.0,
            max_batch=settings.inference_max_batch,
            max_candidates=settings.inference_max_candidates,
            heartbeat_s=settings.inference_heartbeat_s,
            omega=settings.inference_omega,
        )


@dataclass(frozen=True)
class RegistrySnapshot:
    """What the registry said about a model at `at` (time.monotonic)."""

    at: float
    generations: dict[int, int]
    states: dict[int, str]
    serving: dict[int, AdapterRef]
    erased: int
    """How many of the model's samples are erased (a change: forget them)."""


def read_snapshot(engine: Engine, model_id: str) -> RegistrySnapshot:
    """The registry's shards, serving versions and erased-sample count of `model_id`, now (`at` is
    taken before the queries: the snapshot is never younger than what it saw)."""
    began = time.monotonic()
    with session_scope(engine) as session:
        rows = session.execute(
            select(Shard.index, Shard.generation, Shard.state).where(Shard.model_id == model_id)
        ).all()
        refs = serving_refs(session, model_id)
        erased = session.scalar(
            select(func.count())
            .select_from(SampleRow)
            .where(SampleRow.model_id == model_id, SampleRow.erased.is_(True))
        )
    return RegistrySnapshot(
        began,
        {int(i): int(g) for i, g, _ in rows},
        {int(i): str(s) for i, _, s in rows},
        refs,
        int(erased or 0),
    )


@dataclass(frozen=True)
class Scored:
    """P(Yes) of a batch of prompts and what scored them."""

    p_yes: np.ndarray
    omega: np.ndarray
    adapter_versions: dict[str, int]
    """Shard id -> the adapter version that served (weight allowed)."""
    adapter_sha256: dict[str, str]
    """Shard id -> sha256 of that version (what caches are keyed by)."""
    excluded_shards: list[str]
    """Shards that got weight 0 (stale, or without a serving adapter)."""


@dataclass
class _Job:
    prompts: list[str]
    request: bool = False
    """One ranking request scored with per-request ω and its shared prefix (`score_request`)."""
    done: threading.Event = field(default_factory=threading.Event)
    abandoned: bool = False
    """The caller stopped waiting (timeout): not scored if it was not started yet."""
    result: Scored | None = None
    error: BaseException | None = None


class Replica:
    """One inference replica of a registered model (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        *,
        engine: Engine | None = None,
        backbone: Backbone | None = None,
        config: ServingConfig | None = None,
        model_id: str | None = None,
        replica_id: str | None = None,
        store: ArtifactStore | None = None,
    ) -> None:
        self.settings = settings
        self.config = config or ServingConfig.from_settings(settings)
        self._own_engine = engine is None
        self.engine = engine or make_engine(settings=settings)
        self.store = store or ArtifactStore(settings.artifact_store)
        self.pseudonymizer = pseudonymizer_from_settings(settings)
        self.model_id = model_id or settings.model_id or self._default_model_id()
        self.replica_id = replica_id or settings.replica_id or f"{socket.gethostname()}-{os.getpid()}"
        self._backbone = backbone
        self.scorer: AggregatedScorer | None = None
        self.num_shards = 0
        self.instruction = MOVIE_INSTRUCTION
        self.catalogue: dict[str, str] = {}
        self._catalogue_at = 0.0
        self.ready = threading.Event()
        self.load_error: str | None = None
        self._state = threading.Lock()
        self._blocked: dict[int, int] = {}  # shard -> the generation it was made stale at
        self._loaded: dict[int, AdapterRef] = {}  # what the scorer holds (read without its lock)
        self._snapshot: RegistrySnapshot | None = None
        self._snapshot_dirty = False
        self._erased_seen = -1
        self._pool_ids: dict[str, str] = {}  # sample pseudonym -> sample id, of the neighbour pool
        self._jobs: queue.Queue[_Job] = queue.Queue()
        self._stop = threading.Event()
        self._reload_wanted = threading.Event()
        self._heartbeat_wanted = threading.Event()
        self._threads: list[threading.Thread] = []
        self.events_seen = 0
        self.reloads = 0
        self.last_heartbeat: dict[str, Any] | None = None
        self.consumer_ready = threading.Event()

    def _default_model_id(self) -> str:
        if self.settings.model_dir:
            return os.path.basename(os.path.normpath(self.settings.model_dir))
        with session_scope(self.engine) as session:
            ids = list(session.scalars(select(Model.id).order_by(Model.id)))
        if len(ids) != 1:
            raise ValueError(
                f"the registry holds {len(ids)} models; set APA_MODEL_ID to the one this replica serves"
            )
        return ids[0]

    # -- life cycle ---------------------------------------------------------------------------------

    def start(self, *, load_in_background: bool = True) -> Replica:
        """Start the event consumer, load (in a thread unless told otherwise), then the batcher,
        the reloader and the heartbeats."""
        if self.settings.kafka_bootstrap:
            self._spawn("shard-events", self._consume)
        if load_in_background:
            self._spawn("load", self._load_then_serve)
        else:
            self.load()
            self._serve_threads()
        self._spawn("heartbeat", self._heartbeat_loop)
        return self

    def _spawn(self, name: str, target: Any) -> None:
        thread = threading.Thread(target=target, name=f"apa-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _load_then_serve(self) -> None:
        try:
            self.load()
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("loading the replica failed")
            return
        self._serve_threads()

    def _serve_threads(self) -> None:
        self._spawn("batcher", self._batch_loop)
        self._spawn("reloader", self._reload_loop)

    def wait_ready(self, timeout_s: float) -> None:
        """Block until loaded; RuntimeError with the reason if loading failed, TimeoutError."""
        deadline = time.monotonic() + timeout_s
        while not self.ready.wait(0.1):
            if self.load_error:
                raise RuntimeError(self.load_error)
            if time.monotonic() > deadline:
                raise TimeoutError(f"replica not ready after {timeout_s:.0f} s")

    def close(self) -> None:
        self._stop.set()
        self._reload_wanted.set()
        self._heartbeat_wanted.set()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=10)
        if self.scorer is not None:
            self.scorer.close()
        if self._own_engine:
            self.engine.dispose()

    def __enter__(self) -> Replica:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- loading ------------------------------------------------------------------------------------

    def _load_backbone(self, info: Any) -> Backbone:
        from apa.backbone import Backbone

        config = replace(info.backbone_config, device=self.settings.worker_device)
        layer = self.settings.inference_embed_layer
        if layer is not None:  # ω's neighbours are embedded by this replica, pool and requests alike
            if self.config.weights.strategy == "semantic":
                raise ValueError(
                    "APA_INFERENCE_EMBED_LAYER cannot change the layer of `semantic` ω: its centroids "
                    "were computed at the model's embedding layer"
                )
            config = replace(config, embed_layer=layer)
        if self.settings.worker_model:
            config = replace(config, model=self.settings.worker_model)
        backbone = Backbone.load(config)
        if backbone.model_digest != info.base_model_digest:
            raise RuntimeError(
                f"backbone {config.model!r} (digest {backbone.model_digest[:12]}) is not the base model "
                f"{info.base_model!r} ({info.base_model_digest[:12]}) the adapters were trained on"
            )
        return backbone

    def load(self) -> None:
        """Load the base model, the validation pool, the catalogue and exactly the serving versions
        (sha256-verified); warm the caches the first request would otherwise pay for."""
        from apa.modeldir import ModelDir, ModelInfo

        with session_scope(self.engine) as session:
            model = session.get(Model, self.model_id)
            if model is None:
                raise LookupError(f"model {self.model_id!r} is not registered (run `apa bootstrap`)")
            info = ModelInfo.from_json(model.config, f"model {self.model_id} config")
            rows = registry.live_samples(session, self.model_id, "valid")
            valid = [DataSample.from_dict(json.loads(r.text)) for r in rows if r.text]
            self._pool_ids = {r.sample_pid: s.sample_id for r, s in zip(rows, valid, strict=True)}
            model_dir = model.model_dir
        self._load_catalogue()
        backbone = self._backbone or self._load_backbone(info)
        centroids = None
        if self.config.weights.strategy == "semantic" and model_dir:
            centroids = ModelDir(model_dir).partition().centroids
        if valid:
            self.instruction = valid[0].instruction
        self.num_shards = info.num_shards
        scorer = AggregatedScorer(
            backbone, num_shards=info.num_shards, source=self.store, valid=valid, centroids=centroids
        )
        snapshot = read_snapshot(self.engine, self.model_id)
        scorer.sync(snapshot.serving)
        with self._state:
            self._snapshot = snapshot
            self._loaded = scorer.serving
        self._erased_seen = snapshot.erased
        self.scorer = scorer
        self._forget_erased()
        self._warm()
        self.ready.set()
        self._heartbeat_wanted.set()
        log.info(
            "replica %s serves model %s: %s",
            self.replica_id,
            self.model_id,
            {k: f"v{r.version}" for k, r in sorted(scorer.serving.items())},
        )

    def _warm(self) -> None:
        scorer = self.scorer
        if scorer is None or not scorer.serving or self.config.weights.strategy not in _NEEDS_VALID:
            return
        if scorer.valid_pool:
            scorer.valid_embeddings()
            scorer.valid_prediction_matrix()

    def _load_catalogue(self) -> None:
        with session_scope(self.engine) as session:
            rows = session.execute(
                select(CatalogueItem.item_id, CatalogueItem.title).where(
                    CatalogueItem.model_id == self.model_id
                )
            ).all()
        self.catalogue = {str(i): str(t) for i, t in rows}
        self._catalogue_at = time.monotonic()

    # -- exclusion ----------------------------------------------------------------------------------

    def shard_id(self, index: int) -> str:
        return registry.shard_key(self.model_id, index)

    @property
    def blocked(self) -> dict[int, int]:
        """Shard -> the generation it was made stale at (weight 0 until a newer version serves)."""
        with self._state:
            return dict(self._blocked)

    def block(self, shard: int, generation: int, why: str) -> None:
        """Give `shard` weight 0 from the next batch on (it leaves the heartbeat at once); the
        reload thread unloads its adapter between batches. Never waits for a batch."""
        with self._state:
            if self._blocked.get(shard, -1) < generation:
                self._blocked[shard] = generation
                log.info("shard %s blocked at generation %d (%s)", self.shard_id(shard), generation, why)
            self._snapshot_dirty = True
        self._heartbeat_wanted.set()
        self._reload_wanted.set()

    def _remember_loaded(self) -> None:
        scorer = self.scorer
        if scorer is not None:
            loaded = scorer.serving
            with self._state:
                self._loaded = loaded

    def on_event(self, event: ShardEvent) -> None:
        """React to one shard event of this model (others are ignored)."""
        try:
            ref = ShardRef.parse(event.shard_id)
        except ValueError:
            return
        if ref.model_id != self.model_id or (self.num_shards and ref.index >= self.num_shards):
            return
        self.events_seen += 1
        if event.state in ("stale", "retraining"):
            self.block(ref.index, event.generation, f"{event.state} event")
        else:
            with self._state:
                self._snapshot_dirty = True
            self._reload_wanted.set()

    def _consume(self) -> None:
        """Read every partition of the shard-events topic from its end (no consumer group)."""
        from kafka import KafkaConsumer, TopicPartition

        topic = self.settings.shard_events_topic
        consumer: Any = None
        while not self._stop.is_set():
            try:
                if consumer is None:
                    consumer = KafkaConsumer(
                        bootstrap_servers=[
                            s.strip() for s in (self.settings.kafka_bootstrap or "").split(",") if s.strip()
                        ],
                        group_id=None,
                        enable_auto_commit=False,
                        auto_offset_reset="latest",
                    )
                    partitions = consumer.partitions_for_topic(topic)
                    if not partitions:
                        consumer.close()
                        consumer = None
                        self._stop.wait(1.0)
                        continue
                    assigned = [TopicPartition(topic, p) for p in sorted(partitions)]
                    consumer.assign(assigned)
                    consumer.seek_to_end(*assigned)
                    for tp in assigned:
                        consumer.position(tp)  # resolve "end" now, not at the first poll
                    self.consumer_ready.set()
                    log.info("reading %s (%d partitions)", topic, len(assigned))
                records = consumer.poll(timeout_ms=200)
                for batch in records.values():
                    for record in batch:
                        self._on_message(record.value)
            except Exception as exc:
                log.warning("shard-events consumer: %s (reconnecting; the registry check still runs)", exc)
                if consumer is not None:
                    try:
                        consumer.close()
                    except Exception:
                        pass
                consumer = None
                self._stop.wait(1.0)
        if consumer is not None:
            consumer.close()

    def _on_message(self, raw: bytes | None) -> None:
        try:
            event = ShardEvent.from_dict(json.loads(raw or b"null"))
        except (ValueError, EventValidationError) as exc:
            log.warning("ignoring a malformed shard event: %s", exc)
            return
        self.on_event(event)

    def _check_registry(self) -> None:
        """The safety net before each batch: block every loaded version the registry (read at most
        `registry_max_age_s` ago, or afresh after an event) no longer lists as serving."""
        scorer = self.scorer
        assert scorer is not None
        with self._state:
            snapshot, dirty = self._snapshot, self._snapshot_dirty
        if snapshot is None or dirty or time.monotonic() - snapshot.at > self.config.registry_max_age_s:
            try:
                fresh = read_snapshot(self.engine, self.model_id)
            except Exception as exc:
                age = time.monotonic() - snapshot.at if snapshot else float("inf")
                if age > STALE_SNAPSHOT_S:
                    raise ServiceUnavailable(
                        f"the registry has not answered for {age:.0f} s: cannot check what may serve"
                    ) from exc
                log.warning("registry check failed (%s); the last snapshot is %.1f s old", exc, age)
            else:
                with self._state:
                    if self._snapshot is None or self._snapshot.at < fresh.at:
                        self._snapshot = fresh
                    self._snapshot_dirty = False
                snapshot = fresh
        assert snapshot is not None
        loaded = scorer.serving
        blocked = self.blocked
        for k, ref in loaded.items():
            if snapshot.states.get(k) != "serving" or snapshot.serving.get(k) != ref:
                generation = snapshot.generations.get(k, 0)
                if blocked.get(k, -1) < generation or k not in blocked:
                    self.block(k, max(generation, blocked.get(k, -1)), "registry check")
        servable = {k: r for k, r in scorer.serving.items() if k not in self.blocked}
        if snapshot.serving != servable:
            self._reload_wanted.set()
        if snapshot.erased != self._erased_seen:
            self._forget_erased()

    def _forget_erased(self) -> None:
        """Erased validation samples leave the neighbour pool (and every cache of it)."""
        scorer = self.scorer
        if scorer is None:
            return
        with session_scope(self.engine) as session:
            pids = registry.erased_sample_pids(session, self.model_id)
        ids = [self._pool_ids.pop(p) for p in pids if p in self._pool_ids]
        if ids:
            dropped = scorer.forget(ids)
            log.info("%d erased validation samples left the neighbour pool", dropped)
        self._erased_seen = len(pids)

    # -- hot reload ---------------------------------------------------------------------------------

    def _reload_loop(self) -> None:
        while not self._stop.is_set():
            self._reload_wanted.wait(timeout=10.0)
            self._reload_wanted.clear()
            if self._stop.is_set():
                break
            try:
                self.reload()
            except Exception as exc:
                log.warning("reload failed: %s (retrying)", exc)
                self._stop.wait(1.0)
                self._reload_wanted.set()

    def reload(self) -> bool:
        """Serve what the registry lists now: new versions are loaded and verified in this thread
        while the old set serves, then swapped in between batches. Returns whether anything changed."""
        scorer = self.scorer
        if scorer is None:
            return False
        snapshot = read_snapshot(self.engine, self.model_id)
        blocked = self.blocked
        target = {
            k: ref
            for k, ref in snapshot.serving.items()
            if snapshot.generations.get(k, 0) >= blocked.get(k, -1)
        }
        changed = scorer.serving != target
        if changed:
            scorer.sync(target)
            self.reloads += 1
            self._warm()
            log.info("reloaded: %s", {k: f"v{r.version}" for k, r in sorted(target.items())})
        with self._state:
            for k in target:
                if k in self._blocked and snapshot.generations.get(k, 0) >= self._blocked[k]:
                    del self._blocked[k]
            if self._snapshot is None or self._snapshot.at < snapshot.at:
                self._snapshot = snapshot
            still_blocked = set(self._blocked)
        leftover = sorted(still_blocked & set(scorer.serving))
        if leftover:  # blocked while this reload loaded them (or before it): unload
            scorer.exclude(leftover)
        self._remember_loaded()
        if snapshot.erased != self._erased_seen:
            self._forget_erased()
        self._heartbeat_wanted.set()
        return changed

    def cache_keys(self) -> list[str]:
        """sha256 of the adapters whose validation predictions are cached (what caches are keyed by)."""
        scorer = self.scorer
        if scorer is None:
            return []
        with scorer.locked():
            return sorted(scorer._valid_columns)

    # -- scoring ------------------------------------------------------------------------------------

    def score(self, prompts: Sequence[str], timeout_s: float = 300.0, *, request: bool = False) -> Scored:
        """Score `prompts` in the next micro-batch (with whatever other requests join it); with
        `request`, they are one ranking request's candidates: one ω for all of them (from their
        shared request prefix) and the shared prefix tokens computed once."""
        if not self.ready.is_set():
            raise ServiceUnavailable(self.load_error or "the replica is still loading its model and adapters")
        job = _Job(list(prompts), request)
        self._jobs.put(job)
        if not job.done.wait(timeout_s):
            job.abandoned = True
            raise ServiceUnavailable(f"no answer within {timeout_s:.0f} s")
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    def _batch_loop(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._jobs.get(timeout=0.5)
            except queue.Empty:
                continue
            if first.abandoned:
                continue
            jobs = [first]
            size = len(first.prompts)
            deadline = time.monotonic() + self.config.batch_wait_s
            while size < self.config.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    job = self._jobs.get(timeout=remaining)
                except queue.Empty:
                    break
                if not job.abandoned:
                    jobs.append(job)
                    size += len(job.prompts)
            self._run_jobs([j for j in jobs if not j.request], together=True)
            self._run_jobs([j for j in jobs if j.request], together=False)

    def _run_jobs(self, jobs: list[_Job], *, together: bool) -> None:
        """Score `jobs` as one batch (`together`) or each ranking request on its own, then wake them."""
        groups = [jobs] if together and jobs else [[j] for j in jobs]
        for group in groups:
            try:
                if together:
                    scored = self.score_now([p for j in group for p in j.prompts])
                else:
                    scored = self.score_now(group[0].prompts, request=True)
                start = 0
                for job in group:
                    end = start + len(job.prompts)
                    job.result = replace(scored, p_yes=scored.p_yes[start:end], omega=scored.omega[start:end])
                    start = end
            except BaseException as exc:
                for job in group:
                    job.error = exc
            for job in group:
                job.done.set()

    def score_now(self, prompts: Sequence[str], *, request: bool = False) -> Scored:
        """One batch, in the caller's thread: the registry check, then the scorer with every blocked
        shard at weight 0. `request`: one ranking request's candidates (`AggregatedScorer.score_request`:
        per-request ω, shared prefix computed once)."""
        scorer = self.scorer
        if scorer is None:
            raise ServiceUnavailable("the replica is still loading its model and adapters")
        self._check_registry()
        with scorer.locked():
            serving = scorer.serving
            blocked = self.blocked
            allowed = sorted(k for k in serving if k not in blocked)
            if not allowed:
                stale = sorted(self.shard_id(k) for k in range(self.num_shards))
                raise ServiceUnavailable(f"every shard is stale or without a serving adapter: {stale}")
            excluded = {k for k in serving if k in blocked}
            if request:
                p_yes, omega, _ = scorer.score_request(
                    list(prompts), self.config.level, self.config.weights, excluded
                )
            else:
                p_yes, omega = scorer.score(list(prompts), self.config.level, self.config.weights, excluded)
        return Scored(
            p_yes=p_yes,
            omega=omega,
            adapter_versions={self.shard_id(k): serving[k].version for k in allowed},
            adapter_sha256={self.shard_id(k): serving[k].sha256 for k in allowed},
            excluded_shards=[self.shard_id(k) for k in range(self.num_shards) if k not in allowed],
        )

    # -- recommending -------------------------------------------------------------------------------

    def title(self, item_id: str, field: str) -> str:
        title = self.catalogue.get(item_id)
        if title is None and time.monotonic() - self._catalogue_at > CATALOGUE_RELOAD_S:
            self._load_catalogue()
            title = self.catalogue.get(item_id)
        if title is None:
            raise UnknownItem(item_id, field)
        return title

    def user_history(self, user_id: str) -> list[HistoryItem]:
        """The user's last interactions from their live samples (none for a new or erased user)."""
        user_pid = self.pseudonymizer.user(user_id)
        with session_scope(self.engine) as session:
            texts = list(
                session.scalars(
                    select(SampleRow.text).where(
                        SampleRow.model_id == self.model_id,
                        SampleRow.user_pid == user_pid,
                        SampleRow.erased.is_(False),
                    )
                )
            )
        samples = [DataSample.from_dict(json.loads(t)) for t in texts if t]
        return latest_history(samples, self.catalogue, self.config.history_length)

    def recommend_prompts(
        self,
        user_id: str,
        candidates: Sequence[str],
        history: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[str]:
        """The TALLRec prompt of each candidate for this user (history from the registry unless given)."""
        titles = [self.title(item, f"candidates[{i}]") for i, item in enumerate(candidates)]
        if history is None:
            past = self.user_history(user_id)
        else:
            past = [
                HistoryItem(self.title(h["item_id"], f"history[{i}].item_id"), bool(h["liked"]))
                for i, h in enumerate(history)
            ]
        return [recommend_prompt(past, title, self.instruction) for title in titles]

    def recommend(
        self, user_id: str, candidates: Sequence[str], history: Sequence[Mapping[str, Any]] | None = None
    ) -> dict[str, Any]:
        """`{ranked: [{item_id, p_yes}], adapter_versions, excluded_shards}`, best first."""
        prompts = self.recommend_prompts(user_id, candidates, history)
        scored = self.score(prompts, request=self.config.omega == "per_request")
        order = sorted(range(len(candidates)), key=lambda i: (-float(scored.p_yes[i]), i))
        return {
            "ranked": [{"item_id": candidates[i], "p_yes": float(scored.p_yes[i])} for i in order],
            "adapter_versions": scored.adapter_versions,
            "excluded_shards": scored.excluded_shards,
        }

    # -- heartbeats ---------------------------------------------------------------------------------

    def loaded_versions(self) -> dict[str, int]:
        """Shard id -> version this replica serves (blocked shards are not listed)."""
        with self._state:
            loaded, blocked = dict(self._loaded), set(self._blocked)
        return {self.shard_id(k): r.version for k, r in loaded.items() if k not in blocked}

    def send_heartbeat(self) -> dict[str, Any]:
        """POST the loaded versions to the registry with the replica token; returns what happened."""
        token = self.settings.replica_token
        if not token:
            return {"sent": False, "reason": "APA_REPLICA_TOKEN is not set"}
        url = (
            f"{self.settings.registry_url.rstrip('/')}/replicas/"
            f"{urllib.parse.quote(self.replica_id, safe='')}/heartbeat"
        )
        body = json.dumps({"loaded": self.loaded_versions(), "model_id": self.model_id}).encode()
        req = urllib.request.Request(
            url,
            data=body,
            method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        )
        try:
            with urllib.request.urlopen(req, timeout=5) as response:  # noqa: S310 - configured URL
                return {"sent": True, "status": response.status}
        except urllib.error.HTTPError as exc:
            return {"sent": True, "status": exc.code, "error": exc.read()[:200].decode(errors="replace")}
        except (OSError, ValueError) as exc:
            return {"sent": False, "reason": str(exc)}

    def _heartbeat_loop(self) -> None:
        warned = False
        while not self._stop.is_set():
            liveness.touch(self.settings.liveness_file)
            if self.ready.is_set():
                self.last_heartbeat = self.send_heartbeat()
                if self.last_heartbeat.get("status") != 200 and not warned:
                    log.warning("heartbeat to the registry: %s", self.last_heartbeat)
                    warned = True
                elif self.last_heartbeat.get("status") == 200:
                    warned = False
            self._heartbeat_wanted.wait(timeout=self.config.heartbeat_s)
            self._heartbeat_wanted.clear()


__all__ = [
    "STALE_SNAPSHOT_S",
    "RegistrySnapshot",
    "Replica",
    "Scored",
    "ServiceUnavailable",
    "ServingConfig",
    "UnknownItem",
    "read_snapshot",
]
