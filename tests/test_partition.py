"""Partition strategies: disjoint, complete, balanced, deterministic; Algorithm 1 exactly."""

from __future__ import annotations

import json
import math
from typing import Any, get_args

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apa.partition import (
    STRATEGIES,
    Partition,
    PartitionConfig,
    StrategyName,
    balanced_greedy,
    partition,
)

ALL_STRATEGIES: tuple[StrategyName, ...] = get_args(StrategyName)


def _ids(n: int) -> list[str]:
    return [f"s{i:04d}" for i in range(n)]


def _blobs(k: int, per_blob: int, d: int, seed: int, noise: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """k blobs of `per_blob` points around 10 * e_j (far apart in angle too), rows shuffled."""
    rng = np.random.default_rng(seed)
    blob = np.repeat(np.arange(k), per_blob)
    rng.shuffle(blob)
    x = 10.0 * np.eye(d)[blob] + noise * rng.normal(size=(len(blob), d))
    return x, blob


def _algorithm1_reference(h: np.ndarray, centres: np.ndarray, t: int) -> list[list[int]]:
    """Algorithm 1, lines 4-10, transcribed literally: list F of (i, k, -cos), sort, walk."""
    f = []
    for i in range(len(h)):
        for k in range(len(centres)):
            cos = float(h[i] @ centres[k]) / (float(np.linalg.norm(h[i])) * float(np.linalg.norm(centres[k])))
            f.append((i, k, -cos))
    f_s = sorted(f, key=lambda item: item[2])
    shards: list[list[int]] = [[] for _ in centres]
    assigned: set[int] = set()
    for i, k, _ in f_s:
        if len(shards[k]) < t and i not in assigned:
            shards[k].append(i)
            assigned.add(i)
    return shards


@st.composite
def problems(draw: st.DrawFn) -> dict[str, Any]:
    """N samples, K shards, t = ceil(N/K) + slack, users (>= K of them), embeddings seed."""
    n = draw(st.integers(1, 40))
    num_users = draw(st.integers(1, n))
    k = draw(st.integers(1, min(num_users, 6)))
    extra = [draw(st.integers(0, num_users - 1)) for _ in range(n - num_users)]
    users = [f"u{u}" for u in list(range(num_users)) + extra]  # every user owns >= 1 sample
    order = draw(st.permutations(range(n)))
    return {
        "n": n,
        "k": k,
        "slack": draw(st.integers(0, 3)),
        "seed": draw(st.integers(0, 2**32 - 1)),
        "data_seed": draw(st.integers(0, 1000)),
        "users": [users[i] for i in order],
        "labels": [draw(st.integers(0, 1)) for _ in range(n)],
    }


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems())
def test_shards_are_disjoint_complete_capped_and_deterministic(
    strategy: StrategyName, problem: dict[str, Any]
) -> None:
    n, k = problem["n"], problem["k"]
    t = math.ceil(n / k) + problem["slack"]
    ids = _ids(n)
    x = np.random.default_rng(problem["data_seed"]).normal(size=(n, 3))
    users, labels = problem["users"], problem["labels"]
    config = PartitionConfig(strategy=strategy, num_shards=k, max_shard_size=t, seed=problem["seed"])

    p = partition(ids, config, embeddings=x, user_ids=users, labels=labels)

    flat = [s for shard in p.shards for s in shard]
    assert len(flat) == len(set(flat)) == n and set(flat) == set(ids)
    assert all(shard == sorted(shard) for shard in p.shards)
    assert all(p.shard_of(s) == j for j, shard in enumerate(p.shards) for s in shard)
    if strategy == "user":
        largest_user = max(users.count(u) for u in set(users))
        assert max(p.sizes) <= t + largest_user - 1
        for u in set(users):
            assert len({p.shard_of(s) for s, owner in zip(ids, users, strict=True) if owner == u}) == 1
    elif strategy == "stratified":  # each label split as evenly as it divides, whatever t
        for c in set(labels):
            per_shard = [sum(labels[ids.index(s)] == c for s in shard) for shard in p.shards]
            assert set(per_shard) <= {labels.count(c) // k, math.ceil(labels.count(c) / k)}
        assert max(p.sizes) <= math.ceil(n / k) + len(set(labels)) - 1
    else:
        assert max(p.sizes) <= t
    if strategy == "random":
        assert max(p.sizes) - min(p.sizes) <= 1

    again = partition(ids, config, embeddings=x, user_ids=users, labels=labels)
    assert again == p
    shuffled = np.random.default_rng(problem["data_seed"]).permutation(n)
    permuted = partition(
        [ids[i] for i in shuffled],
        config,
        embeddings=x[shuffled],
        user_ids=[users[i] for i in shuffled],
        labels=[labels[i] for i in shuffled],
    )
    assert permuted.shards == p.shards


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(2, 30),
    k=st.integers(1, 5),
    slack=st.integers(0, 4),
    seed=st.integers(0, 1000),
)
def test_semantic_equals_literal_algorithm1_on_its_kmeans_centres(
    n: int, k: int, slack: int, seed: int
) -> None:
    k = min(k, n)
    t = math.ceil(n / k) + slack
    x = np.random.default_rng(seed).normal(size=(n, 4))
    p = partition(_ids(n), PartitionConfig(num_shards=k, max_shard_size=t, seed=seed), embeddings=x)
    assert p.centroids is not None
    expected = _algorithm1_reference(x, p.centroids, t)
    assert p.shards == [sorted(_ids(n)[i] for i in shard) for shard in expected]


def test_semantic_centroids_are_the_kmeans_centres() -> None:
    from sklearn.cluster import KMeans

    x, _ = _blobs(k=3, per_blob=10, d=5, seed=1, noise=2.0)
    p = partition(_ids(30), PartitionConfig(num_shards=3, seed=7), embeddings=x)
    km = KMeans(n_clusters=3, n_init=1, random_state=7).fit(x)
    assert p.centroids is not None
    np.testing.assert_allclose(p.centroids, km.cluster_centers_)


def test_semantic_recovers_equal_gaussian_blobs_exactly() -> None:
    x, blob = _blobs(k=4, per_blob=25, d=8, seed=0)
    ids = _ids(100)
    p = partition(ids, PartitionConfig(num_shards=4, seed=3), embeddings=x)
    truth = {frozenset(s for s, b in zip(ids, blob, strict=True) if b == j) for j in range(4)}
    assert {frozenset(shard) for shard in p.shards} == truth


def test_semantic_assigns_by_cosine_not_euclidean_distance() -> None:
    rng = np.random.default_rng(0)
    near_a = np.array([1.0, 0.0]) + 0.01 * rng.normal(size=(30, 2))
    near_b = np.array([10.0, 10.0]) + 0.01 * rng.normal(size=(30, 2))
    probe = np.array([[1.0, 1.5]])  # Euclidean: next to A's centre; angle: 56 deg, nearer B's 45 than A's 0
    x = np.vstack([near_a, near_b, probe])
    ids = _ids(61)
    p = partition(ids, PartitionConfig(num_shards=2, max_shard_size=61), embeddings=x)

    assert p.centroids is not None
    shard_b = p.shard_of(ids[30])
    euclid_nearest = int(np.argmin(np.linalg.norm(p.centroids - probe, axis=1)))
    assert euclid_nearest != shard_b  # the case is one where the two distances disagree
    assert p.shard_of(ids[60]) == shard_b
    assert {p.shard_of(s) for s in ids[:30]} == {1 - shard_b}


def test_balanced_greedy_caps_the_shard_every_sample_is_nearest_to() -> None:
    rng = np.random.default_rng(0)
    n, k, t = 40, 4, 10
    dist = 1.0 + rng.random((n, k))
    dist[:, 0] = rng.random(n)  # centre 0 is the nearest for every sample
    labels = balanced_greedy(dist, t)
    assert np.bincount(labels, minlength=k).tolist() == [10, 10, 10, 10]
    assert set(np.flatnonzero(labels == 0)) == set(np.argsort(dist[:, 0])[:t])


def test_balanced_greedy_breaks_distance_ties_by_sample_then_shard() -> None:
    dist = np.random.default_rng(0).integers(0, 3, size=(40, 4)).astype(float)  # many exact ties
    pairs = sorted((dist[i, k], i, k) for i in range(40) for k in range(4))
    expected, sizes = [-1] * 40, [0] * 4
    for _, i, k in pairs:
        if expected[i] < 0 and sizes[k] < 10:
            expected[i], sizes[k] = k, sizes[k] + 1
    assert balanced_greedy(dist, 10).tolist() == expected


def test_semantic_caps_a_dominant_cluster_at_t() -> None:
    rng = np.random.default_rng(0)
    big = np.array([10.0, 0, 0, 0]) + 0.1 * rng.normal(size=(97, 4))
    small = 10.0 * np.eye(4)[1:] + 0.1 * rng.normal(size=(3, 4))
    p = partition(_ids(100), PartitionConfig(num_shards=4), embeddings=np.vstack([big, small]))
    assert p.sizes == [25, 25, 25, 25]


def test_balanced_greedy_sends_a_user_that_fits_nowhere_to_the_emptiest_shard() -> None:
    # users of 3, 3, 2 samples, 2 shards of t = 4; users 0 and 1 are nearest to shard 0
    dist = np.array([[0.1, 0.9], [0.2, 0.8], [0.7, 0.3]])
    labels = balanced_greedy(dist, 4, weights=np.array([3, 3, 2]))
    # user 1 fits nowhere once 0 and 2 are placed (3 + 3 > 4, 2 + 3 > 4): it joins the emptier shard 1
    assert labels.tolist() == [0, 1, 1]


def test_user_bound_t_plus_largest_user_minus_one_is_reached_when_forced() -> None:
    ids = _ids(6)
    users = ["a", "a", "b", "b", "c", "c"]
    p = partition(ids, PartitionConfig(strategy="user", num_shards=2), user_ids=users)
    assert sorted(p.sizes) == [2, 4]  # t = 3, largest user m = 2: bound t + m - 1 = 4 is exact


def test_user_without_embeddings_is_seeded_and_has_no_centroids() -> None:
    ids = _ids(60)
    users = [f"u{i % 15}" for i in range(60)]
    p = partition(ids, PartitionConfig(strategy="user", num_shards=3, seed=1), user_ids=users)
    assert p.centroids is None and p.sizes == [20, 20, 20]
    assert partition(ids, PartitionConfig(strategy="user", num_shards=3, seed=1), user_ids=users) == p
    q = partition(ids, PartitionConfig(strategy="user", num_shards=3, seed=2), user_ids=users)
    assert q.shards != p.shards


def test_user_with_embeddings_groups_users_of_the_same_blob() -> None:
    # 12 users, 3 per blob, 5 samples each, every sample of a user in that user's blob
    rng = np.random.default_rng(0)
    user_blob = np.repeat(np.arange(4), 3)
    users = [f"u{u}" for u in range(12) for _ in range(5)]
    x = 10.0 * np.eye(6)[np.repeat(user_blob, 5)] + 0.1 * rng.normal(size=(60, 6))
    ids = _ids(60)
    p = partition(ids, PartitionConfig(strategy="user", num_shards=4, seed=0), embeddings=x, user_ids=users)
    assert p.centroids is not None and p.centroids.shape == (4, 6)
    blob_of = {s: int(user_blob[int(u[1:])]) for s, u in zip(ids, users, strict=True)}
    assert all(len({blob_of[s] for s in shard}) == 1 for shard in p.shards)


def test_random_differs_across_seeds_and_ignores_embeddings() -> None:
    ids = _ids(100)
    p0 = partition(ids, PartitionConfig(strategy="random", seed=0))
    p1 = partition(ids, PartitionConfig(strategy="random", seed=1))
    assert p0.shards != p1.shards
    assert p0.sizes == [25, 25, 25, 25] and p0.centroids is None
    x = np.random.default_rng(0).normal(size=(100, 3))
    assert partition(ids, PartitionConfig(strategy="random", seed=0), embeddings=x) == p0


def test_bekm_centroids_are_shard_means_and_a_fixed_point() -> None:
    x, _ = _blobs(k=4, per_blob=15, d=6, seed=2)
    ids = _ids(60)
    p = partition(
        ids, PartitionConfig(strategy="bekm", num_shards=4, seed=5, balanced_iters=100), embeddings=x
    )
    assert p.centroids is not None
    for j, shard in enumerate(p.shards):
        rows = [ids.index(s) for s in shard]
        np.testing.assert_allclose(p.centroids[j], x[rows].mean(0))
    sq = ((x[:, None, :] - p.centroids[None, :, :]) ** 2).sum(-1)
    labels = balanced_greedy(sq, 15)
    assert [sorted(ids[i] for i in np.flatnonzero(labels == j)) for j in range(4)] == p.shards


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_shards": 0}, "num_shards"),
        ({"num_shards": True}, "num_shards"),
        ({"num_shards": "4"}, "num_shards"),
        ({"max_shard_size": 0}, "max_shard_size"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**32}, "seed"),
        ({"strategy": "kmeans"}, "strategy"),
        ({"kmeans_n_init": 0}, "kmeans_n_init"),
        ({"kmeans_max_iter": 0}, "kmeans_max_iter"),
        ({"balanced_iters": 0}, "balanced_iters"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        PartitionConfig(**kwargs)


def test_config_accepts_numpy_integers_and_stays_json_safe() -> None:
    config = PartitionConfig(num_shards=np.int64(3), max_shard_size=np.int32(5), seed=np.uint32(7))
    assert (config.num_shards, config.max_shard_size, config.seed) == (3, 5, 7)
    p = partition(_ids(12), PartitionConfig(strategy="random", num_shards=np.int64(3)))
    assert Partition.from_json(json.loads(json.dumps(p.to_json()))) == p


X5 = np.zeros((5, 2)) + np.arange(5)[:, None]


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: partition(_ids(3), PartitionConfig(num_shards=4), embeddings=X5[:3]), "num_shards"),
        (lambda: partition(_ids(5), PartitionConfig(strategy="semantic")), "embeddings"),
        (lambda: partition(_ids(5), PartitionConfig(strategy="bekm")), "embeddings"),
        (lambda: partition(_ids(5), PartitionConfig(), embeddings=X5[:4]), "embeddings"),
        (lambda: partition(_ids(5), PartitionConfig(), embeddings=X5[:, 0]), "embeddings"),
        (lambda: partition(_ids(5), PartitionConfig(), embeddings=X5 * np.nan), "embeddings"),
        (lambda: partition(_ids(5), PartitionConfig(strategy="user", num_shards=2)), "user_ids"),
        (
            lambda: partition(_ids(5), PartitionConfig(strategy="user", num_shards=2), user_ids=["a"] * 4),
            "user_ids",
        ),
        (
            lambda: partition(_ids(5), PartitionConfig(strategy="user", num_shards=2), user_ids=["a"] * 5),
            "user_ids",
        ),
        (lambda: partition(_ids(5), PartitionConfig(strategy="stratified"), embeddings=X5), "labels"),
        (
            lambda: partition(_ids(5), PartitionConfig(strategy="stratified"), embeddings=X5, labels=[1] * 4),
            "labels",
        ),
        (lambda: partition(["a", "a", "b"], PartitionConfig(strategy="random", num_shards=2)), "duplicates"),
        (lambda: partition([], PartitionConfig(strategy="random")), "sample_ids"),
        (lambda: partition("abcde", PartitionConfig(strategy="random")), "sample_ids"),
        (
            lambda: partition(_ids(9), PartitionConfig(strategy="random", num_shards=2, max_shard_size=4)),
            "max_shard_size",
        ),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(call: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_partition_json_round_trip(strategy: StrategyName) -> None:
    x, _ = _blobs(k=3, per_blob=7, d=4, seed=0)
    users = [f"u{i % 7}" for i in range(21)]
    p = partition(
        _ids(21),
        PartitionConfig(strategy=strategy, num_shards=3, seed=11),
        embeddings=x,
        user_ids=users,
        labels=[i % 2 for i in range(21)],
    )
    data = json.loads(json.dumps(p.to_json()))
    assert data["strategy"] == strategy and data["seed"] == 11
    q = Partition.from_json(data)
    assert q == p and q.config == p.config and q.shards == p.shards
    if p.centroids is None:
        assert q.centroids is None
    else:
        assert q.centroids is not None and np.array_equal(q.centroids, p.centroids)


def test_partition_rejects_inconsistent_shards() -> None:
    config = PartitionConfig(strategy="random", num_shards=2)
    with pytest.raises(ValueError, match="shards"):
        Partition(shards=[["a", "b"], ["b"]], centroids=None, config=config)
    with pytest.raises(ValueError, match="shards"):
        Partition(shards=[["a"]], centroids=None, config=config)
    with pytest.raises(ValueError, match="centroids"):
        Partition(shards=[["a"], ["b"]], centroids=np.zeros((3, 2)), config=config)
    with pytest.raises(ValueError, match="unknown"):
        Partition.from_json({"shards": [["a"], ["b"]], "centroids": None, "num_shards": 2, "colour": 1})
    with pytest.raises(KeyError, match="zz"):
        Partition(shards=[["a"], ["b"]], centroids=None, config=config).shard_of("zz")


def test_every_strategy_name_has_a_registered_strategy() -> None:
    assert set(STRATEGIES) == set(ALL_STRATEGIES)


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_uses_embeddings_says_whether_the_embeddings_change_the_shards(strategy: StrategyName) -> None:
    """`PartitionConfig.uses_embeddings` decides whether the study and `apa train` embed the
    training prompts: it must be True exactly where two embeddings of the same samples give
    different shards (two blob layouts of 12 users' 60 samples), and False at K=1."""
    ids = _ids(60)
    users = [f"u{i % 12}" for i in range(60)]
    labels = [i % 2 for i in range(60)]
    a, _ = _blobs(4, 15, 6, seed=1)
    b, _ = _blobs(4, 15, 6, seed=2)
    config = PartitionConfig(strategy=strategy, seed=0)
    shards = [partition(ids, config, embeddings=x, user_ids=users, labels=labels).shards for x in (a, b)]
    assert config.uses_embeddings == (shards[0] != shards[1])
    assert config.uses_embeddings == STRATEGIES[strategy].uses_embeddings
    assert not PartitionConfig(strategy=strategy, num_shards=1).uses_embeddings


def _yes_rates(p: Partition, label_of: dict[str, int]) -> list[float]:
    return [float(np.mean([label_of[s] for s in shard])) for shard in p.shards]


def test_stratified_spreads_each_label_evenly_where_semantic_shards_are_label_skewed() -> None:
    # 4 blobs of 40; blob j is mostly Yes for j < 2 and mostly No otherwise, as semantic clusters of
    # prompts can be (docs/RESULTS.md: shards' Yes rates 0.38-0.74 at 1024 training samples)
    x, blob = _blobs(k=4, per_blob=40, d=6, seed=3)
    rng = np.random.default_rng(0)
    labels = [int(rng.random() < (0.85 if b < 2 else 0.15)) for b in blob]
    ids = _ids(len(x))
    label_of = dict(zip(ids, labels, strict=True))
    semantic = partition(ids, PartitionConfig(strategy="semantic", num_shards=4), embeddings=x)
    stratified = partition(
        ids, PartitionConfig(strategy="stratified", num_shards=4), embeddings=x, labels=labels
    )
    assert np.ptp(_yes_rates(semantic, label_of)) > 0.5  # the skew is there to remove
    yes = sum(labels)
    for shard in stratified.shards:  # 160 samples: each shard gets its quarter of each label
        assert sum(label_of[s] for s in shard) in (yes // 4, math.ceil(yes / 4))
    assert max(stratified.sizes) - min(stratified.sizes) <= 2
    # the same K-means centres: semantic ω serves against the same centroids
    assert stratified.centroids is not None and semantic.centroids is not None
    assert np.array_equal(stratified.centroids, semantic.centroids)
    # each label's samples still go to their nearest centre while it has room: no shard gets more
    # than its share of a label, and a sample only moves when its own label's share is full
    for k, shard in enumerate(stratified.shards):
        for c in (0, 1):
            share = labels.count(c) // 4
            assert sum(label_of[s] == c for s in shard) <= share + 1
            moved_in = [s for s in shard if label_of[s] == c and semantic.shard_of(s) != k]
            if moved_in:
                home = {semantic.shard_of(s) for s in moved_in}
                assert all(sum(label_of[s] == c for s in stratified.shards[h]) >= share for h in home)


def test_stratified_equals_semantic_when_every_cluster_holds_its_share_of_each_label() -> None:
    x, blob = _blobs(k=4, per_blob=20, d=6, seed=5)
    labels = [0] * len(x)
    for b in range(4):  # every blob: 10 Yes, 10 No
        for i in np.flatnonzero(blob == b)[:10]:
            labels[i] = 1
    ids = _ids(len(x))
    semantic = partition(ids, PartitionConfig(strategy="semantic", num_shards=4), embeddings=x)
    stratified = partition(
        ids, PartitionConfig(strategy="stratified", num_shards=4), embeddings=x, labels=labels
    )
    assert stratified.shards == semantic.shards
    assert sorted(map(sorted, semantic.shards)) == sorted(
        sorted(ids[i] for i in np.flatnonzero(blob == b)) for b in range(4)
    )
