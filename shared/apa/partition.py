"""Data partition: split the training samples into K disjoint shards, one LoRA adapter each.

Strategies (docs/ARCHITECTURE.md §3, paper §3.2.1 and §4.4.1), each one class plus one `STRATEGIES` entry:

* `semantic` -- Algorithm 1 of the paper: K-means on the frozen LLM's hidden states h_i, then
  walk every (sample, centre) pair in ascending cosine distance and put sample i into shard k
  if i is still unassigned and |D_k| < t.
* `random`   -- SISA: a seeded shuffle cut into K near-equal shards.
* `user`     -- RecEraser's user-based balanced partition: a user's samples never split.
* `bekm`     -- GraphEraser's balanced embedding K-means.
* `stratified` -- a variant of `semantic` (not the paper's): the same K-means centres, with the
  greedy walk run once per label so that every shard gets its share of each label.

Every strategy is deterministic under `PartitionConfig.seed` and independent of the order in
which the samples are given (samples are put in sorted-id order first).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Literal, get_args

import numpy as np
import numpy.typing as npt

StrategyName = Literal["semantic", "random", "user", "bekm", "stratified"]
FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class PartitionConfig:
    """How to partition: strategy, K, cap t, seed and the K-means knobs (saved in partition.json)."""

    strategy: StrategyName = "semantic"
    """How samples are split into shards (Algorithm 1 of the paper is `semantic`)."""
    num_shards: int = 4
    """K: number of shards, one LoRA adapter each."""
    max_shard_size: int | None = None
    """t: cap on shard size in samples; default ceil(N / K). Must satisfy K * t >= N."""
    seed: int = 0
    """Seed of every random choice (K-means init, shuffles, initial centroids)."""
    kmeans_n_init: int = 1
    """scikit-learn KMeans `n_init` for `semantic` (1 = its 'auto' for k-means++ init)."""
    kmeans_max_iter: int = 300
    """scikit-learn KMeans `max_iter` for `semantic`."""
    balanced_iters: int = 20
    """T: max rounds of balanced K-means for `bekm` and `user` (GraphEraser's default 20);
    stops early once no assignment changes."""

    def __post_init__(self) -> None:
        if self.strategy not in get_args(StrategyName):
            raise ValueError(f"strategy must be one of {get_args(StrategyName)}, got {self.strategy!r}")
        for name, minimum in [
            ("num_shards", 1),
            ("seed", 0),
            ("kmeans_n_init", 1),
            ("kmeans_max_iter", 1),
            ("balanced_iters", 1),
        ]:
            object.__setattr__(self, name, _checked_int(name, getattr(self, name), minimum))
        if self.max_shard_size is not None:
            object.__setattr__(self, "max_shard_size", _checked_int("max_shard_size", self.max_shard_size, 1))
        if self.seed >= 2**32:
            raise ValueError(f"seed must be < 2**32 (scikit-learn's limit), got {self.seed}")

    @property
    def uses_embeddings(self) -> bool:
        """Whether this partition clusters the training prompts' embeddings (its strategy's
        `uses_embeddings`; K=1 is one shard and embeds nothing)."""
        return self.num_shards > 1 and STRATEGIES[self.strategy].uses_embeddings

    def cap(self, num_samples: int) -> int:
        """t for N = `num_samples`: `max_shard_size`, or ceil(N / K) when unset."""
        if self.max_shard_size is not None:
            return self.max_shard_size
        return math.ceil(num_samples / self.num_shards)


def _checked_int(name: str, value: object, minimum: int) -> int:
    """`value` as a plain int (numpy integers accepted, so the config stays JSON-safe)."""
    if not isinstance(value, int | np.integer) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


@dataclass(eq=False)
class Partition:
    """The shards of one partition run, as saved in `partition.json` (docs/ARCHITECTURE.md §4)."""

    shards: list[list[str]]
    """Sample ids of each shard, each list sorted; shard k trains adapter k."""
    centroids: FloatArray | None
    """K x d shard centres in embedding space (`semantic`, `bekm`, `user` with embeddings), else None."""
    config: PartitionConfig
    """The configuration that produced the shards."""
    _index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if any(not isinstance(s, str) for shard in self.shards for s in shard):
            raise ValueError("shards: sample ids must be strings")
        self.shards = [sorted(shard) for shard in self.shards]
        if len(self.shards) != self.config.num_shards:
            raise ValueError(f"shards: expected {self.config.num_shards} shards, got {len(self.shards)}")
        self._index = {}
        for k, shard in enumerate(self.shards):
            for sample_id in shard:
                if sample_id in self._index:
                    raise ValueError(
                        f"shards: sample {sample_id!r} is in shards {self._index[sample_id]} and {k}"
                    )
                self._index[sample_id] = k
        if self.centroids is not None:
            self.centroids = np.asarray(self.centroids, dtype=np.float64)
            if self.centroids.ndim != 2 or self.centroids.shape[0] != len(self.shards):
                raise ValueError(
                    f"centroids: expected shape ({len(self.shards)}, d), got {self.centroids.shape}"
                )

    @property
    def sizes(self) -> list[int]:
        """Number of samples in each shard."""
        return [len(shard) for shard in self.shards]

    def shard_of(self, sample_id: str) -> int:
        """Index of the shard holding `sample_id` (KeyError if it is in none)."""
        try:
            return self._index[sample_id]
        except KeyError:
            raise KeyError(f"sample {sample_id!r} is in no shard") from None

    def to_json(self) -> dict[str, Any]:
        """JSON-safe dict: the config's fields, `shards` and `centroids` (list of lists or null)."""
        return {
            **asdict(self.config),
            "shards": [list(shard) for shard in self.shards],
            "centroids": None if self.centroids is None else self.centroids.tolist(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Partition:
        """Inverse of `to_json`."""
        names = {f.name for f in fields(PartitionConfig)}
        unknown = set(data) - names - {"shards", "centroids"}
        if unknown:
            raise ValueError(f"partition json: unknown keys {sorted(unknown)}")
        if "shards" not in data:
            raise ValueError("partition json: missing 'shards'")
        config = PartitionConfig(**{k: v for k, v in data.items() if k in names})
        centroids = data.get("centroids")
        return cls(
            shards=[list(shard) for shard in data["shards"]],
            centroids=None if centroids is None else np.asarray(centroids, dtype=np.float64),
            config=config,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Partition):
            return NotImplemented
        if self.config != other.config or self.shards != other.shards:
            return False
        if self.centroids is None or other.centroids is None:
            return self.centroids is None and other.centroids is None
        return bool(np.array_equal(self.centroids, other.centroids))


# ----------------------------------------------------------------------------------------------
# Building blocks shared by the strategies.


def balanced_greedy(
    dist: FloatArray, cap: int, weights: IntArray | None = None, overflow: bool = True
) -> IntArray:
    """Lines 4-10 of Algorithm 1: walk all (item i, shard k) pairs in ascending `dist[i, k]`
    and put i into k if i is unassigned and shard k still has room for it (|D_k| + w_i <= t).

    Ties are broken by (i, k). Items of weight w_i (a user's sample count) that fit nowhere
    when the walk ends go, heaviest first, to the shard with the fewest samples (lowest index
    on ties); with `overflow=False` they are left at -1. Given K * cap >= sum(w): with unit
    weights that never happens, so every |D_k| <= cap; in general every |D_k| <= cap - 1 + max(w)
    (see `UserStrategy`).
    """
    n, k = dist.shape
    w = [1] * n if weights is None else [int(x) for x in weights]
    order = np.argsort(dist, axis=None, kind="stable")  # flattened row-major: index = i * k + j
    rows, cols = np.divmod(order, k)
    labels = [-1] * n
    sizes = [0] * k
    left = n
    for i, j in zip(rows.tolist(), cols.tolist(), strict=True):
        if labels[i] < 0 and sizes[j] + w[i] <= cap:
            labels[i] = j
            sizes[j] += w[i]
            left -= 1
            if left == 0:
                break
    if left and overflow:
        for i in sorted((i for i in range(n) if labels[i] < 0), key=lambda i: (-w[i], i)):
            j = min(range(k), key=lambda j: (sizes[j], j))
            labels[i] = j
            sizes[j] += w[i]
    return np.asarray(labels, dtype=np.int64)


def cosine_distance(x: FloatArray, centres: FloatArray) -> FloatArray:
    """1 - cos(x_i, a_k) for every row pair (Eq. 3 up to a constant); zero rows are at distance 1."""
    xn = x / _safe_norm(x)
    cn = centres / _safe_norm(centres)
    return 1.0 - xn @ cn.T  # type: ignore[no-any-return]


def _safe_norm(x: FloatArray) -> FloatArray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.where(norm > 0, norm, 1.0)


def _sq_euclidean(x: FloatArray, centres: FloatArray) -> FloatArray:
    d = (x * x).sum(1)[:, None] - 2.0 * x @ centres.T + (centres * centres).sum(1)[None, :]
    return np.maximum(d, 0.0)  # type: ignore[no-any-return]


def _balanced_kmeans(
    points: FloatArray,
    k: int,
    cap: int,
    iters: int,
    rng: np.random.Generator,
    weights: IntArray | None = None,
) -> tuple[IntArray, FloatArray]:
    """Balanced K-means as in GraphEraser's `ConstrainedKmeans` and RecEraser's partitions:
    K distinct random points as initial centres, then up to `iters` rounds of (squared Euclidean
    distances, `balanced_greedy` with cap, centres = unweighted mean of each shard's points),
    stopping once the assignment no longer changes. An empty shard keeps its previous centre."""
    centres = points[rng.choice(len(points), size=k, replace=False)].copy()
    labels: IntArray | None = None
    for _ in range(iters):
        new = balanced_greedy(_sq_euclidean(points, centres), cap, weights)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = labels == j
            if members.any():
                centres[j] = points[members].mean(0)
    assert labels is not None
    return labels, centres


# ----------------------------------------------------------------------------------------------
# Strategies: one class each, one entry in STRATEGIES.


@dataclass(frozen=True)
class ShardingTask:
    """What a strategy sees: N samples in sorted-id order, already validated."""

    n: int
    """N: number of samples."""
    cap: int
    """t: the shard size cap in samples."""
    config: PartitionConfig
    embeddings: FloatArray | None
    """N x d, row i is sample i (None if not given)."""
    user_ids: list[str] | None
    """Owner of sample i (None if not given)."""
    labels: IntArray | None = None
    """Label of sample i, 1 = Yes (None if not given)."""


class Strategy(ABC):
    """Assigns each sample of a `ShardingTask` a shard index in [0, K)."""

    needs_embeddings: ClassVar[bool] = False
    """`partition` refuses to run this strategy without embeddings."""
    uses_embeddings: ClassVar[bool] = False
    """The assignment depends on the embeddings when they are given (True wherever `needs_embeddings`)."""
    needs_user_ids: ClassVar[bool] = False
    needs_labels: ClassVar[bool] = False

    @abstractmethod
    def assign(self, task: ShardingTask) -> tuple[IntArray, FloatArray | None]:
        """(shard index per sample, K x d centroids or None)."""


def _kmeans_centres(task: ShardingTask) -> FloatArray:
    """Algorithm 1's centres a_k: scikit-learn KMeans (random_state=seed) on the h_i."""
    from sklearn.cluster import KMeans

    assert task.embeddings is not None
    cfg = task.config
    km = KMeans(
        n_clusters=cfg.num_shards,
        n_init=cfg.kmeans_n_init,
        max_iter=cfg.kmeans_max_iter,
        random_state=cfg.seed,
    ).fit(task.embeddings)
    return np.asarray(km.cluster_centers_, dtype=np.float64)


class SemanticStrategy(Strategy):
    """Algorithm 1: scikit-learn KMeans (random_state=seed) on h_i, then `balanced_greedy` on
    the cosine distances to the K-means centres a_k. Centroids are the a_k."""

    needs_embeddings = uses_embeddings = True

    def assign(self, task: ShardingTask) -> tuple[IntArray, FloatArray | None]:
        assert task.embeddings is not None
        centres = _kmeans_centres(task)
        return balanced_greedy(cosine_distance(task.embeddings, centres), task.cap), centres


class StratifiedStrategy(Strategy):
    """`semantic` with every shard holding its share of each label (a variant, not the paper's).

    The K-means centres a_k are Algorithm 1's. For each label c, its N_c samples walk the
    (sample, centre) pairs in ascending cosine distance with cap floor(N_c / K) per shard, and
    the N_c mod K left over walk again with one more place per shard. So every shard holds
    floor(N_c / K) or ceil(N_c / K) samples of each label: the shards' label rates are equal up
    to that rounding, and their sizes differ by at most the number of labels (t is not used: a
    shard holds at most ceil(N / K) + labels - 1 samples). Semantic shards can be label-skewed
    (Yes rates 0.38-0.74 at 1024 training samples, docs/RESULTS.md), and the paper's error then
    picks an adapter by its label prior; this removes the skew and keeps each shard near one
    centre. Like every partition here it is fixed once built, so erasure stays exact."""

    needs_embeddings = uses_embeddings = True
    needs_labels = True

    def assign(self, task: ShardingTask) -> tuple[IntArray, FloatArray | None]:
        assert task.embeddings is not None and task.labels is not None
        centres = _kmeans_centres(task)
        dist = cosine_distance(task.embeddings, centres)
        shards = np.empty(task.n, dtype=np.int64)
        for label in np.unique(task.labels):
            rows = np.flatnonzero(task.labels == label)
            first = balanced_greedy(dist[rows], len(rows) // len(centres), overflow=False)
            left = first < 0
            if left.any():  # fewer than K: each goes to a different shard, nearest first
                first[left] = balanced_greedy(dist[rows[left]], 1)
            shards[rows] = first
        return shards, centres


class RandomStrategy(Strategy):
    """SISA: a seeded permutation cut into K contiguous, near-equal pieces (sizes differ by <= 1)."""

    def assign(self, task: ShardingTask) -> tuple[IntArray, FloatArray | None]:
        perm = np.random.default_rng(task.config.seed).permutation(task.n)
        labels = np.empty(task.n, dtype=np.int64)
        for k, piece in enumerate(np.array_split(perm, task.config.num_shards)):
            labels[piece] = k
        return labels, None


class UserStrategy(Strategy):
    """RecEraser's user-based balanced partition (UBP), with the cap counted in samples.

    A user's embedding is the mean of their samples' embeddings; anchors come from balanced
    K-means over users as in RecEraser's `data_partition_2` (K random users as initial anchors,
    squared Euclidean distance, greedy walk with cap, anchor = mean of its users' embeddings,
    up to `balanced_iters` rounds). A user of n_u samples joins the nearest anchor whose shard
    still has room for all n_u. Without embeddings the distances are seeded uniform random
    numbers (a random balanced assignment of users); centroids are then None.

    Bound: a user is indivisible, so with m = the largest number of samples of one user, every
    shard holds at most t + m - 1 samples (exactly <= t when m == 1). A user that fits nowhere
    goes to the smallest shard, which then holds at most floor((N - n_u) / K) <= t - 1 samples.
    """

    needs_user_ids = True
    uses_embeddings = True

    def assign(self, task: ShardingTask) -> tuple[IntArray, FloatArray | None]:
        assert task.user_ids is not None
        k = task.config.num_shards
        users, inverse = np.unique(np.asarray(task.user_ids, dtype=object), return_inverse=True)
        inverse = inverse.reshape(-1)
        if len(users) < k:
            raise ValueError(f"user_ids: {len(users)} distinct users cannot fill num_shards={k} shards")
        counts = np.bincount(inverse).astype(np.int64)
        rng = np.random.default_rng(task.config.seed)
        if task.embeddings is None:
            user_labels = balanced_greedy(rng.random((len(users), k)), task.cap, counts)
            return user_labels[inverse], None
        sums = np.zeros((len(users), task.embeddings.shape[1]), dtype=np.float64)
        np.add.at(sums, inverse, task.embeddings)
        user_emb = sums / counts[:, None]
        user_labels, anchors = _balanced_kmeans(
            user_emb, k, task.cap, task.config.balanced_iters, rng, weights=counts
        )
        return user_labels[inverse], anchors


class BEKMStrategy(Strategy):
    """GraphEraser's balanced embedding K-means (`ConstrainedKmeans`): K random samples as
    initial centroids, then rounds of squared-Euclidean distances, greedy walk with cap t and
    centroid = shard mean, until the assignment is stable or `balanced_iters` rounds ran."""

    needs_embeddings = uses_embeddings = True

    def assign(self, task: ShardingTask) -> tuple[IntArray, FloatArray | None]:
        assert task.embeddings is not None
        cfg = task.config
        rng = np.random.default_rng(cfg.seed)
        return _balanced_kmeans(task.embeddings, cfg.num_shards, task.cap, cfg.balanced_iters, rng)


STRATEGIES: dict[str, Strategy] = {
    "semantic": SemanticStrategy(),
    "random": RandomStrategy(),
    "user": UserStrategy(),
    "bekm": BEKMStrategy(),
    "stratified": StratifiedStrategy(),
}


def _per_sample(
    name: str, values: Sequence[Any] | None, required: bool, strategy: str, order: list[int]
) -> list[Any] | None:
    """`values` (one per sample) put in `order`; None when not given and the strategy does not need
    them. A missing required argument, or one of the wrong length, is a ValueError naming it."""
    if values is None:
        if required:
            raise ValueError(f"{name} are required by strategy {strategy!r}")
        return None
    if isinstance(values, str) or len(values) != len(order):
        raise ValueError(f"{name} must have one entry per sample (N={len(order)})")
    return [values[i] for i in order]


def partition(
    sample_ids: Sequence[str],
    config: PartitionConfig,
    embeddings: npt.ArrayLike | None = None,
    user_ids: Sequence[str] | None = None,
    labels: Sequence[int] | None = None,
) -> Partition:
    """Split `sample_ids` into `config.num_shards` disjoint shards.

    `embeddings` (N x d, row i belongs to `sample_ids[i]`) are required by `semantic` and `bekm`
    and used by `user` when given; `user_ids[i]` is the owner of `sample_ids[i]` (required by
    `user`); `labels[i]` is the label of `sample_ids[i]` (required by `stratified`). The result
    depends only on the set of (id, embedding, user, label) tuples and the config, not on their
    order.
    """
    if isinstance(sample_ids, str):
        raise ValueError("sample_ids must be a sequence of ids, not one string")
    ids = list(sample_ids)
    n, k = len(ids), config.num_shards
    if n == 0:
        raise ValueError("sample_ids is empty")
    if not all(isinstance(s, str) for s in ids):
        raise ValueError("sample_ids must all be strings")
    if len(set(ids)) != n:
        raise ValueError("sample_ids contains duplicates")
    if k > n:
        raise ValueError(f"num_shards={k} exceeds the number of samples N={n} (sample_ids)")
    cap = config.cap(n)
    if cap * k < n:
        raise ValueError(f"max_shard_size={cap} too small: {k} shards of at most {cap} cannot hold N={n}")
    strategy = STRATEGIES[config.strategy]
    order = sorted(range(n), key=ids.__getitem__)

    emb: FloatArray | None = None
    if embeddings is None:
        if strategy.needs_embeddings:
            raise ValueError(f"embeddings are required by strategy {config.strategy!r}")
    else:
        arr = np.asarray(embeddings, dtype=np.float64)  # float64: scikit-learn's k-means++ is faster on it
        if arr.ndim != 2 or arr.shape[0] != n:
            raise ValueError(f"embeddings must have shape (N={n}, d), got {arr.shape}")
        if not np.isfinite(arr).all():
            raise ValueError("embeddings contain NaN or inf")
        emb = arr[order]

    owners = _per_sample("user_ids", user_ids, strategy.needs_user_ids, config.strategy, order)
    users = None if owners is None else [str(u) for u in owners]
    given = _per_sample("labels", labels, strategy.needs_labels, config.strategy, order)
    ys = None if given is None else np.asarray([int(y) for y in given], dtype=np.int64)

    assigned, centroids = strategy.assign(
        ShardingTask(n=n, cap=cap, config=config, embeddings=emb, user_ids=users, labels=ys)
    )
    shards: list[list[str]] = [[] for _ in range(k)]
    for pos, shard in zip(order, assigned.tolist(), strict=True):
        shards[shard].append(ids[pos])
    return Partition(shards=shards, centroids=centroids, config=config)
