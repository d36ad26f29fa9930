"""Deployment files, offline: the Dockerfile, docker-compose.yml, the k8s/ overlays, the container
helpers in docker/, the README's configuration table and the architecture picture.

Nothing here needs Docker or a cluster. The compose file is validated against the Compose
specification's JSON schema (vendored in tests/schemas/), every k8s overlay is rendered with
`kubectl kustomize` and every object validated against the Kubernetes schemas of
`kubernetes-validate`; only the tests that need `kubectl` skip, and only where it is not installed.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import http.server
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from apa.cli import commands, find_command, normalise_args
from apa.pseudonyms import Pseudonymizer
from apa.settings import ENV_PREFIX, Settings, field_docs, markdown_table

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
COMPOSE_SCHEMA = REPO / "tests" / "schemas" / "compose-spec.json"
DOCKERFILE = REPO / "Dockerfile"
K8S = REPO / "k8s"
OVERLAYS = ("dev", "prod")
K8S_VERSION = "1.32.0"
"""Kubernetes version the manifests target; `kubernetes-validate` ships its schemas."""

# --- Names that issues 8 and 9 add. The deployment files use them already; the lead deletes each line
# --- when its issue merges (test_pending_names_are_still_pending fails once a name exists).
PENDING_COMMANDS: dict[str, str] = {}
PENDING_SETTINGS: dict[str, str] = {}

ROLE_OF_COMMAND = {
    "db": "db-migrate",
    "serve-registry": "registry",
    "run-erasure-consumer": "erasure-consumer",
    "run-worker": "trainer",
    "serve-inference": "inference",
}
"""The role an APA container plays, from the `apa` sub-command it runs."""

ROLE_OF_PACKAGE = {
    "registry": "registry",
    "erasure": "erasure-consumer",
    "trainer": "trainer",
    "inference": "inference",
}
"""services/<package> -> role."""

READS: dict[str, set[str]] = {
    # What each role reads from the environment. The services' own code is scanned as well
    # (test_services_read_no_setting_missing_from_READS), the library calls they make are listed here.
    "db-migrate": {"APA_DATABASE_URL", "APA_MIGRATIONS_DIR"},
    "registry": {
        "APA_DATABASE_URL", "APA_API_TOKEN", "APA_ALLOW_UNAUTHENTICATED", "APA_PSEUDONYM_KEY",
        "APA_KAFKA_BOOTSTRAP", "APA_ERASURE_TOPIC", "APA_KAFKA_TIMEOUT_S", "APA_REPLICA_LIVE_SECONDS",
        "APA_MIGRATIONS_DIR", "APA_LOG_LEVEL", "APA_REPLICA_TOKEN", "APA_AUDIT_KEY",
        "APA_SIGNING_KEY", "APA_AUDIT_ANCHOR_TOPIC", "APA_AUDIT_ANCHOR_INTERVAL_S", "APA_AUDIT_LEGACY_ROWS",
        "APA_ERASURE_PUBLISH_TIMEOUT_S",
    },
    "erasure-consumer": {
        "APA_DATABASE_URL", "APA_PSEUDONYM_KEY", "APA_AUDIT_KEY", "APA_KAFKA_BOOTSTRAP",
        "APA_ERASURE_TOPIC", "APA_SHARD_EVENTS_TOPIC", "APA_DEAD_LETTER_TOPIC",
        "APA_ERASURE_CONSUMER_GROUP", "APA_KAFKA_SESSION_TIMEOUT_MS", "APA_KAFKA_HEARTBEAT_INTERVAL_MS",
        "APA_KAFKA_MAX_POLL_INTERVAL_MS", "APA_KAFKA_TIMEOUT_S", "APA_CELERY_BROKER_URL",
        "APA_MODEL_DIR", "APA_ARTIFACT_STORE", "APA_LIVENESS_FILE", "APA_LOG_LEVEL", "APA_CACHE_DIR",
        "APA_CRASH_AT", "APA_ERASURE_MAX_EVENT_BYTES", "APA_RETRAIN_QUEUE",
    },
    "trainer": {
        "APA_DATABASE_URL", "APA_PSEUDONYM_KEY", "APA_AUDIT_KEY", "APA_CELERY_BROKER_URL",
        "APA_KAFKA_BOOTSTRAP", "APA_SHARD_EVENTS_TOPIC", "APA_KAFKA_TIMEOUT_S", "APA_ARTIFACT_STORE",
        "APA_MODEL_DIR", "APA_MODEL_ID", "APA_CACHE_DIR", "APA_LIVENESS_FILE", "APA_LOG_LEVEL",
        "APA_CRASH_AT", "APA_RETRAIN_QUEUE", "APA_WORKER_CONCURRENCY", "APA_WORKER_DEVICE", "APA_WORKER_MODEL",
        "APA_WORKER_POOL",
    },
    "inference": {
        "APA_DATABASE_URL", "APA_API_TOKEN", "APA_ALLOW_UNAUTHENTICATED", "APA_PSEUDONYM_KEY",
        "APA_KAFKA_BOOTSTRAP", "APA_SHARD_EVENTS_TOPIC", "APA_KAFKA_TIMEOUT_S", "APA_ARTIFACT_STORE",
        "APA_MODEL_DIR", "APA_MODEL_ID", "APA_REGISTRY_URL", "APA_REPLICA_ID", "APA_REPLICA_TOKEN",
        "APA_CACHE_DIR", "APA_LOG_LEVEL", "APA_WORKER_MODEL", "APA_WORKER_DEVICE", "APA_LIVENESS_FILE",
        "APA_INFERENCE_LEVEL", "APA_INFERENCE_STRATEGY",
        "APA_INFERENCE_REGISTRY_MAX_AGE_S", "APA_INFERENCE_BATCH_WAIT_MS", "APA_INFERENCE_MAX_BATCH",
        "APA_INFERENCE_MAX_CANDIDATES", "APA_INFERENCE_HEARTBEAT_S", "APA_INFERENCE_OMEGA",
        "APA_INFERENCE_EMBED_LAYER",
    },
}  # fmt: skip

UNSET_ON_PURPOSE = {
    # Settings whose default is None (or a local path/URL) and that the deployment leaves unset.
    "APA_MODEL_ID": "the model directory's name (`apa` under /var/lib/apa/models) is the registry id",
    "APA_REPLICA_ID": "the default, host name + process id, is unique per gunicorn worker and pod",
    "APA_MIGRATIONS_DIR": "the migrations installed with the package",
    "APA_CELERY_RESULT_BACKEND": "no task result is read back",
    "APA_CELERY_EMBEDDED_BROKER": "the deployments use RabbitMQ (APA_CELERY_BROKER_URL), not the embedded broker",
    "APA_WORKER_MODEL": "workers train with the registered model's own backbone",
    "APA_CRASH_AT": "testing only (fault injection)",
    "APA_INFERENCE_EMBED_LAYER": "ω embeds at the model's own layer (the paper's: the last); an early exit is opt-in",
    "APA_AUDIT_ANCHOR_FILE": "anchors go to the Kafka topic apa.audit-anchors (several registry replicas "
    "must not share one append-only file)",
}


# --- helpers ---------------------------------------------------------------------------------------

FIELDS = {ENV_PREFIX + f.name.upper(): f for f in dataclasses.fields(Settings)}
"""Every setting, read from the dataclass itself: fields added later are covered."""


@functools.cache
def source_variables() -> frozenset[str]:
    """APA_* variables named as whole string literals in the library and the services (read outside
    `Settings`, e.g. APA_CACHE_DIR by apa.backbone)."""
    found: set[str] = set()
    for root in (REPO / "shared" / "apa", REPO / "services"):
        for path in root.rglob("*.py"):
            found.update(re.findall(r"[\"'](APA_[A-Z0-9_]+)[\"']", path.read_text(encoding="utf-8")))
    return frozenset(found)


def known_variables() -> set[str]:
    return set(FIELDS) | set(source_variables()) | set(PENDING_SETTINGS)


def must_be_set(var: str) -> bool:
    """Whether a deployment has to set `var`: its default would not work in a container."""
    if var in UNSET_ON_PURPOSE:
        return False
    field = FIELDS.get(var)
    if field is None:  # pending, or read outside Settings: no default we can judge
        return True
    default = field.default
    if default is None:
        return True
    return isinstance(default, str) and (
        default.startswith(("sqlite:", "./")) or "127.0.0.1" in default or "localhost" in default
    )


def known_commands() -> set[str]:
    return set(commands()) | set(PENDING_COMMANDS)


def check_apa_args(args: list[str]) -> str | None:
    """Why `apa <args>` would not parse (None when it would). Pending commands: the name only."""
    if not args:
        return "no sub-command"
    name, rest = args[0], args[1:]
    if name in PENDING_COMMANDS and find_command(name) is None:
        return None
    command = find_command(name)
    if command is None:
        return f"unknown apa command {name!r}"
    from jsonargparse import ArgumentParser

    func = command.load()
    parser = ArgumentParser(exit_on_error=False)
    parser.add_function_arguments(func, as_positional=True)
    try:
        parser.parse_args(normalise_args(func, rest))
    except Exception as exc:  # jsonargparse's ArgumentError, a bad value
        return f"apa {' '.join(args)}: {exc}"
    return None


# --- Dockerfile ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Instruction:
    keyword: str
    args: str
    stage: str


def dockerfile() -> tuple[dict[str, str], list[Instruction]]:
    """(global ARGs, instructions with their stage), continuation lines joined, comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    assert not pending, "Dockerfile ends inside a continuation"
    global_args: dict[str, str] = {}
    instructions: list[Instruction] = []
    stage = ""
    for line in lines:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = args.split()
            stage = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else parts[0]
        elif keyword == "ARG" and not stage:
            name, _, value = args.partition("=")
            global_args[name] = value.strip('"')
        instructions.append(Instruction(keyword, args.strip(), stage))
    return global_args, instructions


def makefile_variable(name: str) -> str:
    match = re.search(rf"^{name}\s*:?=\s*(.+)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert match, f"Makefile has no {name}"
    return match.group(1).strip()


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def test_dockerfile_pins_torch_and_the_no_deps_packages_like_the_makefile():
    global_args, instructions = dockerfile()
    assert makefile_variable("TORCH") == f"torch=={global_args['TORCH_VERSION']}"
    assert makefile_variable("NO_DEPS") == global_args["NO_DEPS"]
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'"torch=={global_args["TORCH_VERSION"]}"' in pyproject
    runs = {i.stage: i.args for i in instructions if i.keyword == "RUN" and "torch==" in i.args}
    assert set(runs) == {"torch-cpu", "torch-cuda"}
    cpu_index = next(
        i.args for i in instructions if i.stage == "torch-cpu" and i.args.startswith("TORCH_CPU")
    )
    assert cpu_index.endswith("download.pytorch.org/whl/cpu"), "the CPU image installs the CPU-only wheel"
    assert any(i.keyword == "RUN" and "--no-deps ${NO_DEPS}" in i.args for i in instructions)


def test_dockerfile_builds_a_cpu_and_a_cuda_variant_in_stages():
    global_args, instructions = dockerfile()
    stages = [i.args.split()[-1] for i in instructions if i.keyword == "FROM"]
    assert len(stages) == len(set(stages)) >= 4, "multi-stage, every stage named"
    froms = {i.args.split()[-1]: i.args.split()[0] for i in instructions if i.keyword == "FROM"}
    assert froms["build"] == "torch-${VARIANT}"
    for variant in ("cpu", "cuda"):
        assert f"torch-{variant}" in stages
    assert global_args["VARIANT"] == "cpu"
    assert stages[-1] == "runtime" and froms["runtime"] == "python-base", "the runtime starts clean"
    copies_from_build = [i.args for i in instructions if i.stage == "runtime" and i.keyword == "COPY"]
    assert any(a.startswith("--from=build /opt/venv") for a in copies_from_build)


def _dockerignore_excludes(path: str) -> bool:
    """Whether .dockerignore keeps `path` out of the build context (last matching rule wins; a rule
    matches a path or any of its parent folders, as Docker's matcher does)."""
    excluded = False
    rules = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    candidates = [path] + [str(p) for p in Path(path).parents if str(p) != "."]
    for rule in rules:
        negate = rule.startswith("!")
        pattern = rule.lstrip("!").rstrip("/")
        regex = (
            "^"
            + re.escape(pattern).replace(r"\*\*", ".*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
            + "$"
        )
        if any(re.match(regex, c) for c in candidates):
            excluded = not negate
    return excluded


def test_every_copy_source_exists_and_is_in_the_build_context():
    _, instructions = dockerfile()
    sources = []
    for i in instructions:
        if i.keyword != "COPY":
            continue
        words = [w for w in i.args.split() if not w.startswith("--")]
        if any(w.startswith("--from=") for w in i.args.split()):
            continue
        sources += words[:-1]
    assert {"pyproject.toml", "shared", "services", "migrations", "docker/entrypoint.sh"} <= set(sources)
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: no such file in the repository"
        assert not _dockerignore_excludes(source), f"COPY {source}: excluded by .dockerignore"
    for secret in ("secrets/APA_API_TOKEN", "k8s/overlays/prod/secrets.env", ".venv/bin/python"):
        assert _dockerignore_excludes(secret), f"{secret} would be sent to the Docker daemon"


def test_runtime_image_is_non_root_with_volumes_health_check_and_an_apa_entry_point():
    _, instructions = dockerfile()
    runtime = [i for i in instructions if i.stage == "runtime"]
    user = [i.args for i in runtime if i.keyword == "USER"]
    assert user and user[-1].split(":")[0] not in {"0", "root"}
    env = " ".join(i.args for i in runtime if i.keyword == "ENV")
    store = re.search(r"APA_ARTIFACT_STORE=(\S+)", env)
    cache = re.search(r"APA_CACHE_DIR=(\S+)", env)
    assert store and cache
    volumes = exec_form(next(i.args for i in runtime if i.keyword == "VOLUME"))
    assert store.group(1) in volumes and cache.group(1) in volumes
    entrypoint = exec_form(next(i.args for i in runtime if i.keyword == "ENTRYPOINT"))
    assert entrypoint[-1] == "apa" and "tini" in entrypoint[0]
    cmd = exec_form(next(i.args for i in runtime if i.keyword == "CMD"))
    assert check_apa_args(cmd) is None
    health = next(i.args for i in runtime if i.keyword == "HEALTHCHECK")
    probe = exec_form(health.split(" CMD ", 1)[1])
    assert probe[:2] == ["apa-healthcheck", "http"]
    assert probe[2].endswith(f":{cmd[cmd.index('--port') + 1]}/healthz"), "probes the port CMD serves"
    for variable in re.findall(r"(APA_[A-Z0-9_]+)=", env):
        assert variable in known_variables(), variable


# --- docker/ helpers -------------------------------------------------------------------------------


def _run_entrypoint(secrets_dir: Path, env: dict[str, str]) -> dict[str, str]:
    done = subprocess.run(
        ["sh", str(REPO / "docker" / "entrypoint.sh"), "env"],
        env={"PATH": "/usr/bin:/bin", "SECRETS_DIR": str(secrets_dir), **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)


def test_entrypoint_turns_secret_files_into_apa_variables(tmp_path):
    (tmp_path / "APA_API_TOKEN").write_text("s3cret token\n")
    (tmp_path / "APA_DATABASE_URL").write_text("postgresql://u:p@h/db")
    (tmp_path / "postgres_password").write_text("not an APA variable")
    (tmp_path / "APA_bad-name").write_text("x")
    env = _run_entrypoint(tmp_path, {"APA_DATABASE_URL": "from-the-environment"})
    assert env["APA_API_TOKEN"] == "s3cret token"  # trailing newline dropped, spaces kept
    assert env["APA_DATABASE_URL"] == "from-the-environment"  # the environment wins
    assert "postgres_password" not in env and "APA_bad-name" not in env


def test_entrypoint_runs_the_command_without_a_secrets_folder(tmp_path):
    env = _run_entrypoint(tmp_path / "absent", {"APA_LOG_LEVEL": "DEBUG"})
    assert env["APA_LOG_LEVEL"] == "DEBUG"


def _load_script(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name.replace(".py", ""), REPO / "docker" / name)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def http_server() -> Iterator[str]:
    """A local server: /ok answers 200, /down 503."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(200 if self.path == "/ok" else 503)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_http_is_healthy_only_on_2xx(http_server):
    script = [sys.executable, str(REPO / "docker" / "healthcheck.py"), "http"]
    assert subprocess.run([*script, f"{http_server}/ok"], capture_output=True).returncode == 0
    assert subprocess.run([*script, f"{http_server}/down"], capture_output=True).returncode == 1
    closed = http_server.rsplit(":", 1)[0] + ":9"  # discard port: refused
    assert subprocess.run([*script, f"{closed}/ok", "--timeout", "2"], capture_output=True).returncode == 1


def test_healthcheck_file_needs_a_recently_touched_liveness_file(tmp_path):
    health = _load_script("healthcheck.py")
    alive = tmp_path / "alive"
    assert health.main(["file", str(alive)]) == 1  # missing
    alive.touch()
    assert health.main(["file", str(alive), "--max-age", "60"]) == 0
    old = time.time() - 600
    import os

    os.utime(alive, (old, old))
    assert health.main(["file", str(alive), "--max-age", "60"]) == 1


def test_make_secrets_writes_every_compose_secret_consistently_and_keeps_existing_ones(tmp_path):
    out = tmp_path / "secrets"
    script = [sys.executable, str(REPO / "docker" / "make_secrets.py"), str(out)]
    subprocess.run(script, check=True, capture_output=True)
    compose = load_compose()
    wanted = {Path(s["file"]).name for s in compose["secrets"].values()}
    # rabbitmq_password is no compose secret: the source of the broker URL and rabbitmq.conf.
    assert {p.name for p in out.iterdir()} == wanted | {"rabbitmq_password"}
    for spec in compose["secrets"].values():
        assert spec["file"].startswith("./secrets/"), "the secrets folder is git- and docker-ignored"
    files = {p.name: p.read_text().strip() for p in out.iterdir()}
    assert f":{files['postgres_password']}@postgres:5432/" in files["APA_DATABASE_URL"]
    assert f":{files['rabbitmq_password']}@rabbitmq:5672/" in files["APA_CELERY_BROKER_URL"]
    assert f"default_pass = {files['rabbitmq_password']}" in files["rabbitmq.conf"]
    Pseudonymizer.from_secret(files["APA_PSEUDONYM_KEY"], source="test")  # a usable key
    (out / "APA_API_TOKEN").write_text("kept\n")
    (out / "APA_AUDIT_KEY").unlink()
    subprocess.run(script, check=True, capture_output=True)
    assert (out / "APA_API_TOKEN").read_text() == "kept\n" and (out / "APA_AUDIT_KEY").is_file()
    assert out.stat().st_mode & 0o077 == 0, "the folder keeps other users out"


# --- docker-compose.yml ----------------------------------------------------------------------------

_DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")


def compose_format_checker() -> jsonschema.FormatChecker:
    """The schema's custom formats, with Compose's meanings (jsonschema knows none of them)."""
    checker = jsonschema.FormatChecker()

    @checker.checks("duration")
    def _duration(value: object) -> bool:
        return not isinstance(value, str) or bool(_DURATION.match(value))

    @checker.checks("ports")
    def _ports(value: object) -> bool:
        pattern = r"^((\[?[0-9a-fA-F.:]+\]?):)?(\d+(-\d+)?:)?\d+(-\d+)?(/(tcp|udp|sctp))?$"
        return not isinstance(value, str) or bool(re.match(pattern, value))

    @checker.checks("expose")
    def _expose(value: object) -> bool:
        return not isinstance(value, str) or bool(re.match(r"^\d+(-\d+)?(/(tcp|udp|sctp))?$", value))

    return checker


def compose_validator() -> jsonschema.protocols.Validator:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    assert schema["$schema"].startswith("http://json-schema.org/draft/2019-09/")  # its own spelling
    jsonschema.Draft201909Validator.check_schema(schema)
    return jsonschema.Draft201909Validator(schema, format_checker=compose_format_checker())


@functools.cache
def _compose_text() -> str:
    return COMPOSE_FILE.read_text()


def load_compose() -> dict[str, Any]:
    return copy.deepcopy(yaml.safe_load(_compose_text()))


def services() -> dict[str, dict[str, Any]]:
    return load_compose()["services"]  # type: ignore[no-any-return]


def is_one_shot(service: dict[str, Any]) -> bool:
    return service.get("restart", "no") == "no"


def is_apa(service: dict[str, Any]) -> bool:
    return str(service.get("image", "")).split(":")[0] == "apa"


def test_compose_file_is_valid_under_the_compose_specification():
    validator = compose_validator()
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(load_compose())
    ]
    assert errors == []


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c["services"]["registry"].update(helthcheck={}),
        lambda c: c["services"]["registry"]["depends_on"]["postgres"].update(condition="healthy"),
        lambda c: c["services"]["registry"]["healthcheck"].update(interval="ten seconds"),
        lambda c: c["services"]["registry"].update(ports=["localhost:eight"]),
        lambda c: c.update(servces={}),
    ],
)
def test_the_schema_check_rejects_a_broken_compose_file(mutate):
    broken = load_compose()
    mutate(broken)
    assert not compose_validator().is_valid(broken)


def test_every_long_running_service_has_a_health_check_and_every_one_shot_disables_it():
    for name, service in services().items():
        health = service.get("healthcheck", {})
        if is_one_shot(service):
            assert health == {"disable": True}, f"{name}: a one-shot job says so explicitly"
        else:
            assert service["restart"] in {"unless-stopped", "always"}, name
            test = health.get("test")
            assert test and test[0] in {"CMD", "CMD-SHELL"} and len(test) > 1, f"{name}: no health check"
            for key in ("interval", "timeout", "retries", "start_period"):
                assert key in health, f"{name}: healthcheck.{key}"


def test_depends_on_uses_conditions_that_can_be_met():
    all_services = services()
    for name, service in all_services.items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions, not a list"
        for target, spec in depends.items():
            assert target in all_services, f"{name} depends on unknown {target}"
            if is_one_shot(all_services[target]):
                assert spec["condition"] == "service_completed_successfully", f"{name} -> {target}"
            else:
                assert spec["condition"] == "service_healthy", f"{name} -> {target}: wait for health"
        if is_apa(service) and not is_one_shot(service):
            assert depends.get("migrate", {}).get("condition") == "service_completed_successfully", name


def test_apa_services_use_known_commands_and_the_image_for_their_variant():
    apa = {name: s for name, s in services().items() if is_apa(s)}
    assert {ROLE_OF_COMMAND[s["command"][0]] for s in apa.values()} == set(READS)
    for name, service in apa.items():
        assert check_apa_args(service["command"]) is None, name
        variant = service["image"].split(":")[1]
        assert service["build"] == {"context": ".", "args": {"VARIANT": variant}}, name
        test = service.get("healthcheck", {}).get("test", [])
        if "http" in test:
            port = service["command"][service["command"].index("--port") + 1]
            assert re.match(rf"http://127\.0\.0\.1:{port}/(healthz|readyz)$", test[test.index("http") + 1]), (
                name
            )


def compose_environment(service: dict[str, Any]) -> dict[str, str]:
    """What an APA container sees: the image's ENV, `environment`, and its APA_* secret files."""
    _, instructions = dockerfile()
    env = {}
    for i in instructions:
        if i.stage == "runtime" and i.keyword == "ENV":
            env.update(re.findall(r"(APA_[A-Z0-9_]+)=(\S+)", i.args))
    env.update({k: str(v) for k, v in service.get("environment", {}).items()})
    for secret in service.get("secrets", []):
        name = secret if isinstance(secret, str) else secret.get("target", secret["source"])
        if name.startswith(ENV_PREFIX):
            env[name] = "<secret>"
    return env


def test_every_apa_variable_set_anywhere_is_a_known_setting():
    compose = load_compose()
    named = set(compose["secrets"])
    for service in compose["services"].values():
        if is_apa(service):
            named |= set(compose_environment(service))
    named = {n for n in named if n.startswith(ENV_PREFIX)}
    assert named - known_variables() == set()


def test_every_setting_a_compose_service_reads_is_set():
    for name, service in services().items():
        if not is_apa(service):
            continue
        role = ROLE_OF_COMMAND[service["command"][0]]
        missing = {v for v in READS[role] if must_be_set(v)} - set(compose_environment(service))
        assert missing == set(), f"{name} ({role}) does not set {sorted(missing)}"


def test_the_replica_token_goes_to_the_registry_and_the_replicas_only():
    for name, service in services().items():
        if is_apa(service):
            role = ROLE_OF_COMMAND[service["command"][0]]
            has = "APA_REPLICA_TOKEN" in service.get("secrets", [])
            assert has == (role in {"registry", "inference"}), name


def test_named_volumes_are_declared_and_hold_the_artifact_store_and_model_cache():
    compose = load_compose()
    declared = set(compose["volumes"])
    used = set()
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            assert not source.startswith((".", "/")), f"{name}: {source} is a bind mount, not a named volume"
            assert source in declared, f"{name}: volume {source} is not declared"
            used.add(source)
        if is_apa(service) and not is_one_shot(service):
            env = compose_environment(service)
            targets = {v.split(":")[1] for v in service["volumes"]}
            assert env["APA_ARTIFACT_STORE"] in targets, f"{name}: the artifact store is not a volume"
            if ROLE_OF_COMMAND[service["command"][0]] in {"trainer", "inference"}:
                assert env["APA_CACHE_DIR"] in targets, f"{name}: the model cache is not a volume"
    assert used == declared


def test_the_trainer_reserves_a_gpu_and_has_a_cpu_fallback_profile():
    all_services = services()
    gpu, cpu = all_services["trainer"], all_services["trainer-cpu"]
    assert gpu["profiles"] == ["gpu"] and cpu["profiles"] == ["cpu"]
    assert gpu["command"] == cpu["command"] == ["run-worker"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["device_ids"]
    assert gpu["image"] == "apa:cuda" and cpu["image"] == "apa:cpu"
    assert "deploy" not in cpu
    profiled = {name for name, s in all_services.items() if "profiles" in s}
    assert profiled == {"trainer", "trainer-cpu"}, "everything else starts with a plain `up`"


def test_compose_runs_postgres_kafka_in_kraft_mode_rabbitmq_and_creates_the_settings_topics():
    all_services = services()
    assert all_services["postgres"]["image"].startswith("postgres:")
    kafka = all_services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert "controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"]
    assert "ZOOKEEPER" not in json.dumps(kafka).upper()
    assert all_services["rabbitmq"]["image"].startswith("rabbitmq:")
    script = all_services["kafka-init"]["command"][0]
    created = set(re.findall(r"--topic (\S+)", script))
    defaults = {
        getattr(Settings(), f.name) for f in dataclasses.fields(Settings) if f.name.endswith("_topic")
    }
    assert created == defaults
    assert "$$@" in script, "compose would interpolate a single $"


def test_liveness_probes_read_the_file_the_services_are_told_to_touch():
    for name, service in services().items():
        test = service.get("healthcheck", {}).get("test", [])
        if "file" in test:
            assert test[test.index("file") + 1] == compose_environment(service)["APA_LIVENESS_FILE"], name


# --- k8s/ ------------------------------------------------------------------------------------------


def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        pytest.skip("kubectl is not installed: the k8s overlays cannot be rendered here")
    return found


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict[str, Any]]]:
    """Every overlay (and the base) rendered by `kubectl kustomize`. The prod overlay needs its
    git-ignored secret files: a copy of k8s/ gets them from the committed *.env.example files."""
    binary = kubectl()
    tree = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, tree, ignore=shutil.ignore_patterns("*.env"))
    for example in tree.rglob("*.env.example"):
        shutil.copy(example, example.with_name(example.name.removesuffix(".example")))
    out = {}
    for name, path in [("base", tree / "base")] + [(o, tree / "overlays" / o) for o in OVERLAYS]:
        done = subprocess.run([binary, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"kubectl kustomize {name}: {done.stderr}"
        out[name] = [d for d in yaml.safe_load_all(done.stdout) if d]
        assert len(out[name]) >= 20, f"{name} rendered only {len(out[name])} objects"
    return out


def test_prod_does_not_render_without_its_secret_files():
    binary = kubectl()
    if (K8S / "overlays" / "prod" / "secrets.env").exists():
        pytest.skip("this checkout has a prod secrets.env")
    done = subprocess.run(
        [binary, "kustomize", str(K8S / "overlays" / "prod")], capture_output=True, text=True
    )
    assert done.returncode != 0 and "secrets.env" in done.stderr


def objects(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_specs(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        f"{d['kind']}/{d['metadata']['name']}": d["spec"]["template"]["spec"]
        for d in docs
        if d["kind"] in {"Deployment", "Job", "StatefulSet", "DaemonSet"}
    }


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def role_of(container: dict[str, Any]) -> str:
    return ROLE_OF_COMMAND[container["args"][0]]


def test_every_object_is_valid_for_the_target_kubernetes_version(rendered):
    import kubernetes_validate

    kinds = set()
    for name, docs in rendered.items():
        for doc in docs:
            kinds.add(doc["kind"])
            try:
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {exc}")
    expected = {
        "Namespace", "ConfigMap", "Secret", "Job", "Deployment", "Service", "PodDisruptionBudget",
        "HorizontalPodAutoscaler", "NetworkPolicy", "Ingress", "PersistentVolumeClaim", "ServiceAccount",
    }  # fmt: skip
    assert expected <= kinds


def test_the_kubernetes_schema_check_rejects_a_broken_object(rendered):
    import kubernetes_validate

    deployment = copy.deepcopy(objects(rendered["dev"], "Deployment")["apa-registry"])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pathh"] = "/x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", ["base", *OVERLAYS])
def test_every_container_has_resources_and_every_deployment_probes(rendered, overlay):
    for where, spec in pod_specs(rendered[overlay]).items():
        for container in containers(spec):
            resources = container.get("resources", {})
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(bound, {})), f"{where}: {bound}"
            if where.startswith("Deployment/"):
                for probe in ("readinessProbe", "livenessProbe"):
                    assert probe in container, f"{where}: no {probe}"
                    check = container[probe]
                    if "httpGet" in check:
                        ports = {p["name"] for p in container["ports"]}
                        assert check["httpGet"]["port"] in ports and check["httpGet"]["path"] in {
                            "/healthz",
                            "/readyz",
                        }
                    else:
                        assert check["exec"]["command"][0] == "apa-healthcheck", where


@pytest.mark.parametrize("overlay", ["base", *OVERLAYS])
def test_pods_run_restricted_without_service_links_or_api_tokens(rendered, overlay):
    for where, spec in pod_specs(rendered[overlay]).items():
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
        # Service links would add APA_REGISTRY_PORT and the like to the environment Settings reads.
        assert spec["enableServiceLinks"] is False, where
        assert spec["automountServiceAccountToken"] is False, where
        for container in containers(spec):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False and context["capabilities"]["drop"] == ["ALL"]
            assert context["readOnlyRootFilesystem"] is True, where
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{where}: a read-only root needs a writable /tmp"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_containers_run_known_commands_and_get_every_setting_they_read(rendered, overlay):
    docs = rendered[overlay]
    config_maps = objects(docs, "ConfigMap")
    data = {("ConfigMap", n): set(d.get("data", {})) for n, d in config_maps.items()}
    data |= {("Secret", n): set(d.get("data", {})) for n, d in objects(docs, "Secret").items()}
    _, instructions = dockerfile()
    image_env = {
        name
        for i in instructions
        if i.stage == "runtime" and i.keyword == "ENV"
        for name in re.findall(r"(APA_[A-Z0-9_]+)=", i.args)
    }
    roles = set()
    for where, spec in pod_specs(docs).items():
        for container in containers(spec):
            assert check_apa_args(container["args"]) is None, where
            role = role_of(container)
            roles.add(role)
            env = set(image_env) | {e["name"] for e in container.get("env", [])}
            for source in container.get("envFrom", []):
                kind, ref = (
                    ("ConfigMap", source["configMapRef"])
                    if "configMapRef" in source
                    else ("Secret", source["secretRef"])
                )
                assert (kind, ref["name"]) in data, f"{where}: {kind} {ref['name']} is not in the overlay"
                env |= data[(kind, ref["name"])]
            assert {e for e in env if e.startswith(ENV_PREFIX)} <= known_variables(), where
            missing = {v for v in READS[role] if must_be_set(v)} - env
            assert missing == set(), f"{where} ({role}) does not get {sorted(missing)}"
            for probe in ("readinessProbe", "livenessProbe"):
                command = container.get(probe, {}).get("exec", {}).get("command", [])
                if "file" in command:
                    (config,) = [
                        config_maps[s["configMapRef"]["name"]]["data"]
                        for s in container["envFrom"]
                        if "configMapRef" in s
                    ]
                    assert command[command.index("file") + 1] == config["APA_LIVENESS_FILE"], where
    assert roles == set(READS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_replica_token_is_mounted_in_the_registry_and_inference_pods_only(rendered, overlay):
    for where, spec in pod_specs(rendered[overlay]).items():
        for container in containers(spec):
            refs = {s["secretRef"]["name"] for s in container.get("envFrom", []) if "secretRef" in s}
            has = any(r.startswith("apa-replica-token") for r in refs)
            assert has == (role_of(container) in {"registry", "inference"}), where


@pytest.mark.parametrize("overlay", ["base", "prod"])
def test_the_trainer_asks_for_a_gpu_on_gpu_nodes(rendered, overlay):
    spec = objects(rendered[overlay], "Deployment")["apa-trainer"]["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert spec["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    assert role_of(container) == "trainer"


def test_the_dev_trainer_falls_back_to_the_cpu(rendered):
    spec = objects(rendered["dev"], "Deployment")["apa-trainer"]["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in json.dumps(spec)
    assert "nodeSelector" not in spec and "tolerations" not in spec


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlays_name_real_images(rendered, overlay):
    for where, spec in pod_specs(rendered[overlay]).items():
        for container in containers(spec):
            assert container["image"] not in {"apa-cpu", "apa-cuda"}, f"{where}: placeholder image"
            assert ":" in container["image"], f"{where}: an image without a tag"


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("overlay", ["base", *OVERLAYS])
def test_services_budgets_and_the_autoscaler_point_at_real_pods(rendered, overlay):
    docs = rendered[overlay]
    deployments = objects(docs, "Deployment")
    pod_labels = {n: d["spec"]["template"]["metadata"]["labels"] for n, d in deployments.items()}
    for name, service in objects(docs, "Service").items():
        if service["spec"].get("type") == "ExternalName":
            continue
        targets = [n for n, labels in pod_labels.items() if _selects(service["spec"]["selector"], labels)]
        assert len(targets) == 1, f"Service {name} selects {targets}"
        ports = {
            p["name"]
            for c in deployments[targets[0]]["spec"]["template"]["spec"]["containers"]
            for p in c.get("ports", [])
        }
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports, name
    for name, budget in objects(docs, "PodDisruptionBudget").items():
        assert any(
            _selects(budget["spec"]["selector"]["matchLabels"], labels) for labels in pod_labels.values()
        ), name
    assert "apa-inference" in objects(docs, "PodDisruptionBudget")
    (hpa,) = objects(docs, "HorizontalPodAutoscaler").values()
    target = hpa["spec"]["scaleTargetRef"]
    assert target["kind"] == "Deployment" and target["name"] == "apa-inference"
    assert "replicas" not in deployments["apa-inference"]["spec"], "the autoscaler owns the replica count"
    claims = set(objects(docs, "PersistentVolumeClaim"))
    for where, spec in pod_specs(docs).items():
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, where
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "apa", f"{doc['kind']}/{doc['metadata']['name']}"


def _peers_admitted(docs: list[dict[str, Any]], labels: dict[str, str]) -> list[dict[str, Any]]:
    """The `from` peers of every NetworkPolicy rule that applies to pods with `labels`."""
    peers = []
    for policy in objects(docs, "NetworkPolicy").values():
        if _selects(policy["spec"]["podSelector"].get("matchLabels", {}), labels):
            for rule in policy["spec"].get("ingress", []):
                peers += rule.get("from", [{"ipBlock": {"cidr": "0.0.0.0/0"}}])
    return peers


@pytest.mark.parametrize("overlay", ["base", *OVERLAYS])
def test_network_policies_admit_outside_traffic_to_registry_and_inference_only(rendered, overlay):
    docs = rendered[overlay]
    policies = objects(docs, "NetworkPolicy")
    deny = [p for p in policies.values() if p["spec"]["podSelector"] == {} and "ingress" not in p["spec"]]
    assert deny and deny[0]["spec"]["policyTypes"] == ["Ingress"], "a default deny for every pod"
    inference_labels = objects(docs, "Deployment")["apa-inference"]["spec"]["template"]["metadata"]["labels"]
    for where, spec in pod_specs(docs).items():
        kind, name = where.split("/")
        source = objects(docs, kind)[name]
        labels = source["spec"]["template"]["metadata"]["labels"]
        peers = _peers_admitted(docs, labels)
        role = role_of(spec["containers"][0])
        if role not in {"registry", "inference"}:
            assert peers == [], f"{where} accepts connections"
            continue
        assert peers, f"{where} is unreachable"
        for peer in peers:
            assert "ipBlock" not in peer, f"{where}: an address block bypasses the pod rules"
        if role == "registry":
            in_namespace = [p["podSelector"] for p in peers if "namespaceSelector" not in p]
            assert in_namespace and all(_selects(s["matchLabels"], inference_labels) for s in in_namespace), (
                "inside the namespace, only inference pods reach the registry (heartbeats)"
            )


def _ingress_routes(docs: list[dict[str, Any]], path: str) -> bool:
    """Whether any Ingress routes `path` (Kubernetes semantics: Exact, or Prefix by path element)."""
    for ingress in objects(docs, "Ingress").values():
        for rule in ingress["spec"]["rules"]:
            for entry in rule["http"]["paths"]:
                prefix, kind = entry["path"].rstrip("/"), entry["pathType"]
                if kind == "Exact" and path == entry["path"]:
                    return True
                if kind == "Prefix" and (path == prefix or path.startswith(prefix + "/")):
                    return True
    return False


@pytest.mark.parametrize("overlay", ["base", *OVERLAYS])
def test_the_ingress_routes_compliance_paths_but_not_the_heartbeat_route(rendered, overlay):
    docs = rendered[overlay]
    for path in ("/erasures", "/erasures/r1", "/users/u1/erasure-status", "/audit", "/shards", "/replicas"):
        assert _ingress_routes(docs, path), path
    for path in ("/replicas/r1/heartbeat", "/replicas/r1", "/healthz", "/readyz"):
        assert not _ingress_routes(docs, path), path
    services_ = objects(docs, "Service")
    for ingress in objects(docs, "Ingress").values():
        for rule in ingress["spec"]["rules"]:
            for entry in rule["http"]["paths"]:
                assert entry["backend"]["service"]["name"] == "apa-registry"
    assert "apa-registry" in services_


def test_kafka_postgres_and_rabbitmq_are_external_services(rendered):
    external = {
        n for n, s in objects(rendered["prod"], "Service").items() if s["spec"].get("type") == "ExternalName"
    }
    assert external == {"kafka", "postgres", "rabbitmq"}
    kinds = {d["kind"] for d in rendered["prod"]}
    assert not kinds & {"StatefulSet", "Kafka", "Cluster"}, "no broker or database is run by these manifests"


def test_compose_and_k8s_run_each_role_with_the_same_command(rendered):
    in_compose = {ROLE_OF_COMMAND[s["command"][0]]: s["command"] for s in services().values() if is_apa(s)}
    for where, spec in pod_specs(rendered["prod"]).items():
        for container in containers(spec):
            assert container["args"] == in_compose[role_of(container)], where


# --- settings names -----------------------------------------------------------------------------------


def _settings_reads_in(package: Path) -> set[str]:
    """Settings fields a service's code reads as `<...>settings.<field>`."""
    import ast

    names = {f.name for f in dataclasses.fields(Settings)}
    found = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr in names:
                owner = node.value
                owner_name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", None)
                if owner_name == "settings":
                    found.add(ENV_PREFIX + node.attr.upper())
    return found


def test_services_read_no_setting_missing_from_READS():
    scanned = {}
    for package, role in ROLE_OF_PACKAGE.items():
        read = _settings_reads_in(REPO / "services" / package)
        scanned[role] = read
        assert read <= READS[role], (
            f"services/{package} reads {sorted(read - READS[role])}: add them to READS"
        )
    assert scanned["registry"], "the scan finds the registry's settings (else it is broken)"


def test_every_setting_that_needs_a_value_is_read_by_a_role_or_left_unset_on_purpose():
    read = set().union(*READS.values())
    undecided = {v for v in FIELDS if must_be_set(v) and v not in read}
    assert undecided == set(), (
        f"{sorted(undecided)}: a new setting without a deployable default; add it to READS (and set it "
        "in docker-compose.yml and k8s/) or to UNSET_ON_PURPOSE with the reason"
    )
    assert set().union(*READS.values()) <= known_variables()


def test_pending_names_are_still_pending():
    """Once issue 8 or 9 adds a name, its line in PENDING_* goes (this fails until it does)."""
    landed = [c for c in PENDING_COMMANDS if c in commands()] + [v for v in PENDING_SETTINGS if v in FIELDS]
    assert landed == [], f"now real: remove {landed} from PENDING_COMMANDS / PENDING_SETTINGS"
    assert not set(PENDING_SETTINGS) & set(source_variables())


# --- README, docs and the picture ----------------------------------------------------------------------

TABLE = re.compile(r"<!-- settings-table:begin.*?-->\n(.*?)<!-- settings-table:end -->", re.DOTALL)


def test_every_setting_has_a_docstring():
    docs = field_docs()
    assert [f.name for f in dataclasses.fields(Settings) if not docs.get(f.name)] == []


def test_the_readme_configuration_table_is_generated_from_the_settings():
    match = TABLE.search((REPO / "README.md").read_text())
    assert match, "README.md has no settings-table block"
    assert match.group(1) == markdown_table(), "regenerate it: .venv/bin/python -m apa.settings"
    assert markdown_table().count("\n") == len(dataclasses.fields(Settings)) + 2


def test_deploy_docs_name_the_operators_with_parseable_example_resources():
    text = (REPO / "docs" / "deploy.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.DOTALL)
    resources = [d for block in blocks for d in yaml.safe_load_all(block) if isinstance(d, dict)]
    kinds = {(d.get("apiVersion", "").split("/")[0], d.get("kind")) for d in resources}
    assert ("kafka.strimzi.io", "Kafka") in kinds and ("kafka.strimzi.io", "KafkaTopic") in kinds
    assert ("postgresql.cnpg.io", "Cluster") in kinds
    topics = {d["metadata"]["name"]: d["spec"] for d in resources if d.get("kind") == "KafkaTopic"}
    settings = Settings()
    assert {t.get("topicName", n) for n, t in topics.items()} >= {
        settings.erasure_topic,
        settings.shard_events_topic,
    }


def _architecture() -> Any:
    spec = importlib.util.spec_from_file_location(
        "deploy_architecture", REPO / "docs" / "deploy_architecture.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_architecture_picture_shows_every_service_and_agrees_with_compose(tmp_path):
    arch = _architecture()
    all_services = services()
    drawn = {name for name in arch.NODES if name in all_services}
    stands_for = {name: [name] for name in drawn} | {"trainer": list(arch.TRAINER_SERVICES)}
    long_running = {n for n, s in all_services.items() if not is_one_shot(s)}
    assert long_running == {s for names in stands_for.values() for s in names}, "draw every service"
    infra = {"postgres", "kafka", "rabbitmq"}
    for source, target, _ in arch.flows(Settings()):
        assert source in arch.NODES and target in arch.NODES
        pair = {source, target}
        for service_node in pair - infra:
            if service_node not in stands_for:
                continue
            for other in pair & infra:
                for service in stands_for[service_node]:
                    assert other in all_services[service].get("depends_on", {}), f"{service} -> {other}"
            for volume_node in pair & set(arch.VOLUMES):
                for service in stands_for[service_node]:
                    mounted = {v.split(":")[0] for v in all_services[service]["volumes"]}
                    assert set(arch.VOLUMES[volume_node]) <= mounted, f"{service} -> {volume_node}"
    assert (REPO / "docs" / "deploy-architecture.png").is_file()
    out = arch.draw(tmp_path / "picture.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
