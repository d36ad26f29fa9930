"""Draw docs/deploy-architecture.png: the deployed topology, from docker-compose.yml and the settings.

    .venv/bin/python docs/deploy_architecture.py [OUT.png]

The boxes are docker-compose.yml's long-running services and its shared volumes (plus the outside
actors); topic and group names come from `apa.settings.Settings`. tests/test_deploy.py checks that
every long-running compose service is drawn, that every flow to Postgres, Kafka or RabbitMQ matches
the service's `depends_on`, and that every flow to a volume matches its mounts, so a change to the
stack that the picture does not show fails the tests.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from apa.settings import Settings

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
OUT = REPO / "docs" / "deploy-architecture.png"


@dataclass(frozen=True)
class Node:
    label: str
    x: float
    y: float
    kind: str  # "actor" | "infra" | "apa" | "volume"


NODES: dict[str, Node] = {
    # Outside actors (not compose services).
    "account-systems": Node("account systems", 0, 5, "actor"),
    "compliance-clients": Node("compliance clients\n(auditors)", 4.5, 5, "actor"),
    "product-services": Node("product services", 9, 5, "actor"),
    # docker-compose.yml services (trainer stands for `trainer` and `trainer-cpu`).
    "kafka": Node("Kafka (KRaft)", 0, 3.4, "infra"),
    "registry": Node("registry + compliance API\napa serve-registry", 4.5, 3.4, "apa"),
    "inference": Node("inference replicas\napa serve-inference", 9, 3.4, "apa"),
    "erasure-consumer": Node("erasure consumer group\napa run-erasure-consumer", 0, 1.7, "apa"),
    "postgres": Node("Postgres\n(registry, audit, outbox)", 4.5, 1.7, "infra"),
    "rabbitmq": Node("RabbitMQ\n(Celery broker)", 0, 0, "infra"),
    "trainer": Node("trainer workers, 1 per GPU\napa run-worker", 4.5, 0, "apa"),
    # Named volumes: the artifact store and the model directories (scrubbed by the erasure consumer).
    "volumes": Node("shared volumes: artifact store,\nmodel directories", 9, 0, "volume"),
}

VOLUMES: dict[str, tuple[str, ...]] = {"volumes": ("artifacts", "models")}
"""Compose volumes each volume box stands for."""

TRAINER_SERVICES = ("trainer", "trainer-cpu")
"""Compose services the `trainer` box stands for."""


def flows(settings: Settings) -> list[tuple[str, str, str]]:
    """(from, to, label): who sends what to whom."""
    return [
        ("account-systems", "kafka", f"{settings.erasure_topic}\nkeyed by user id"),
        ("compliance-clients", "registry", "HTTPS: erasures,\nstatus, audit"),
        ("product-services", "inference", "POST /recommend"),
        ("registry", "kafka", "POST /erasures"),
        ("registry", "postgres", ""),
        ("kafka", "erasure-consumer", f"group {settings.erasure_consumer_group}"),
        ("erasure-consumer", "postgres", "1 transaction\n+ outbox"),
        ("erasure-consumer", "rabbitmq", "retrain_shard"),
        ("rabbitmq", "trainer", "tasks (acks late)"),
        ("trainer", "postgres", "register versions"),
        ("trainer", "volumes", "new adapters"),
        ("kafka", "inference", f"{settings.shard_events_topic} (stale / ready)"),
        ("inference", "registry", "heartbeats\n(replica token)"),
        ("inference", "postgres", "serving set"),
        ("volumes", "inference", "sha256-verified\nadapters"),
    ]


def compose_services() -> dict[str, dict]:  # type: ignore[type-arg]
    return yaml.safe_load(COMPOSE.read_text())["services"]  # type: ignore[no-any-return]


def _edge_point(a: Node, b: Node, width: float, height: float) -> tuple[float, float]:
    """Where the line from a's centre towards b's centre leaves a's box (with a small gap)."""
    dx, dy = b.x - a.x, b.y - a.y
    half_w, half_h = width / 2 + 0.08, height / 2 + 0.08
    scale = min(half_w / abs(dx) if dx else float("inf"), half_h / abs(dy) if dy else float("inf"))
    return a.x + dx * scale, a.y + dy * scale


def draw(out: Path = OUT) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    colours = {"actor": "#f2f2f2", "infra": "#dde8f5", "apa": "#fde9c9", "volume": "#e3f1df"}
    fig, ax = plt.subplots(figsize=(13, 8.5))
    width, height = 2.6, 0.8
    for node in NODES.values():
        ax.add_patch(
            FancyBboxPatch(
                (node.x - width / 2, node.y - height / 2),
                width,
                height,
                boxstyle="round,pad=0.05",
                facecolor=colours[node.kind],
                edgecolor="#444444",
                linestyle="--" if node.kind == "actor" else "-",
            )
        )
        ax.text(node.x, node.y, node.label, ha="center", va="center", fontsize=9)
    for source, target, label in flows(Settings()):
        a, b = NODES[source], NODES[target]
        # Arrows start and end on the boxes' edges; an arrow that would cross a box curves round it.
        long = abs(a.x - b.x) > 5
        start, end = _edge_point(a, b, width, height), _edge_point(b, a, width, height)
        if long:  # from the bottom of one box to the bottom of the other, sagging under the middle
            side = 1 if b.x > a.x else -1
            start = (a.x + side * width / 4, a.y - height / 2 - 0.08)
            end = (b.x - side * width / 4, b.y - height / 2 - 0.08)
        ax.annotate(
            "",
            xy=end,
            xytext=start,
            arrowprops={
                "arrowstyle": "-|>",
                "color": "#555555",
                "shrinkA": 2,
                "shrinkB": 2,
                "connectionstyle": f"arc3,rad={0.15 if long else 0.0}",
            },
        )
        if label:
            mid_x, mid_y = (start[0] + end[0]) / 2, (start[1] + end[1]) / 2
            if long:  # under the curve, left of the middle column's arrows
                mid_x, mid_y = (start[0] + mid_x) / 2, start[1] - 0.3
            ax.text(
                mid_x,
                mid_y,
                label,
                ha="center",
                va="center",
                fontsize=7.5,
                color="#203a70",
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.85, "pad": 1},
            )
    ax.set_xlim(-1.6, 10.6)
    ax.set_ylim(-0.7, 5.7)
    ax.axis("off")
    ax.set_title("APA deployed: docker-compose.yml services and k8s/ Deployments", fontsize=12)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    print(draw(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT))
