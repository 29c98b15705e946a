"""docker-compose.yml and the native stack (scripts/stack.sh) run the same system.

The native side is read through the runner itself (scripts/stack.py: stack.toml,
server.properties, redis.conf, the pom's Kafka version); the compose side is the parsed
YAML. `differences()` lists every drift; the real pair must have none, and doctored copies
of either side must be caught. Needs no running stack.

Allowed differences, and only these: inside Docker the broker binds 0.0.0.0 and has one
more listener (DOCKER, advertised as kafka:29092) for the other containers, and services
reach Kafka/Redis by container name instead of 127.0.0.1.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.conftest import load_stack_runner

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKER_ONLY_LISTENER = "DOCKER"
# Environment variables of the apache/kafka image that are not broker properties.
KAFKA_IMAGE_ENV = {"CLUSTER_ID", "KAFKA_HEAP_OPTS", "KAFKA_JVM_PERFORMANCE_OPTS", "KAFKA_OPTS"}
# Set per side: where things listen and where data lives.
KAFKA_ADDRESS_PROPS = {
    "listeners",
    "advertised.listeners",
    "listener.security.protocol.map",
    "log.dirs",
}
REDIS_SETTINGS = ("appendonly", "appendfsync", "save", "maxmemory", "maxmemory-policy")
# kafka-run-class.sh's own when the image's environment sets none.
KAFKA_IMAGE_PERFORMANCE_OPTS = (
    "-server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 "
    "-XX:+ExplicitGCInvokesConcurrent -XX:MaxInlineLevel=15 -Djava.awt.headless=true"
)
DOCKER_STOP_GRACE = "10s"  # Compose's default stop_grace_period


def seconds(duration: str | int) -> float:
    """A Compose duration ("30s", "1m30s", "500ms") in seconds."""
    text, total = str(duration), 0.0
    for amount, unit in re.findall(r"([0-9.]+)(ms|h|m|s|us)", text):
        total += float(amount) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}[unit]
    return total


runner = load_stack_runner()


POLICY_MOUNT = "${SMARTLEV_STRATEGY_CONFIG:-/dev/null}:/app/policy.toml:ro"


def env_to_property(name: str) -> str:
    """KAFKA_LOG_DIRS -> log.dirs (apache/kafka: '_' is '.', '__' is '_', '___' is '-')."""
    body = name.removeprefix("KAFKA_").lower()
    return (
        body.replace("___", "\0dash")
        .replace("__", "\0us")
        .replace("_", ".")
        .replace("\0dash", "-")
        .replace("\0us", "_")
    )


def listener_map(value: str) -> dict[str, tuple[str, int]]:
    out = {}
    for entry in filter(None, (e.strip() for e in value.split(","))):
        name, _, hostport = entry.partition("://")
        host, _, port = hostport.rpartition(":")
        out[name] = (host, int(port))
    return out


def published(ports: list[str]) -> dict[int, tuple[str, int]]:
    """["127.0.0.1:9092:9092"] -> {9092: ("127.0.0.1", 9092)}: container port -> host ip, port."""
    out = {}
    for spec in ports:
        parts = str(spec).split(":")
        ip, host, container = ("0.0.0.0", *parts) if len(parts) == 2 else parts
        out[int(container)] = (ip, int(host))
    return out


REDIS_HEALTH = ["CMD", "redis-cli", "-e", "ping"]


def redis_args(command: list[str]) -> dict[str, str]:
    """["redis-server", "--appendonly", "yes", ...] -> {"appendonly": "yes", ...}."""
    out: dict[str, str] = {}
    key = None
    for arg in command[1:]:
        if arg.startswith("--"):
            key = arg[2:].lower()
            out[key] = ""
        elif key is not None:
            out[key] = (out[key] + " " + arg).strip()
    return out


def differences(compose: dict[str, Any], config: Path = runner.CONFIG) -> list[str]:
    """Every way in which `compose` (parsed docker-compose.yml) differs from the native stack."""
    native = runner.Stack(root=ROOT, config=config)
    diffs: list[str] = []
    services: dict[str, Any] = compose.get("services", {})
    roles = {n: (s.get("labels") or {}).get("smartlev.role") for n, s in services.items()}
    for name, role in roles.items():
        if role not in ("infra", "init", "service"):
            diffs.append(f"compose service {name}: label smartlev.role is {role!r}")
    if {n for n, r in roles.items() if r == "infra"} != {"kafka", "redis"}:
        diffs.append(
            f"compose infra services are {sorted(n for n, r in roles.items() if r == 'infra')}"
        )

    # ---- Kafka
    kafka = services.get("kafka", {})
    if kafka.get("image") != f"apache/kafka:{native.kafka_version}":
        diffs.append(
            f"kafka image {kafka.get('image')!r} != apache/kafka:{native.kafka_version} (pom)"
        )
    env = {k: str(v) for k, v in (kafka.get("environment") or {}).items()}
    if env.get("CLUSTER_ID") != native.kafka_cfg["cluster_id"]:
        diffs.append(
            f"kafka CLUSTER_ID {env.get('CLUSTER_ID')!r} != {native.kafka_cfg['cluster_id']!r}"
        )
    heap = f"-Xmx{native.kafka_cfg.get('heap', '512m')}"
    if heap not in env.get("KAFKA_HEAP_OPTS", "").split():
        diffs.append(f"kafka KAFKA_HEAP_OPTS {env.get('KAFKA_HEAP_OPTS')!r} lacks {heap}")
    jvm = set(env.get("KAFKA_JVM_PERFORMANCE_OPTS", KAFKA_IMAGE_PERFORMANCE_OPTS).split())
    jvm |= set(env.get("KAFKA_OPTS", "").split())
    for flag in sorted(a for a in native.kafka().argv() if a.startswith("-XX:")):
        if flag not in jvm:  # -XX:+ExitOnOutOfMemoryError: else a broken broker runs on
            diffs.append(f"kafka JVM flag {flag} is native only")
    props = {env_to_property(k): v for k, v in env.items() if k not in KAFKA_IMAGE_ENV}
    nprops = native.kafka_props
    for key in sorted((set(nprops) | set(props)) - KAFKA_ADDRESS_PROPS):
        if nprops.get(key) != props.get(key):
            diffs.append(f"kafka {key}: native {nprops.get(key)!r}, compose {props.get(key)!r}")

    n_listen, c_listen = (listener_map(p.get("listeners", "")) for p in (nprops, props))
    n_adv, c_adv = (listener_map(p.get("advertised.listeners", "")) for p in (nprops, props))
    n_proto, c_proto = (
        dict(e.split(":") for e in p.get("listener.security.protocol.map", "").split(",") if e)
        for p in (nprops, props)
    )
    for name, (_, port) in n_listen.items():
        if c_listen.get(name, ("", None))[1] != port:
            diffs.append(f"kafka listener {name}: native port {port}, compose {c_listen.get(name)}")
    for name, value in n_adv.items():
        if c_adv.get(name) != value:
            diffs.append(
                f"kafka advertised listener {name}: native {value}, compose {c_adv.get(name)}"
            )
    for name, proto in n_proto.items():
        if c_proto.get(name) != proto:
            diffs.append(f"kafka protocol of {name}: native {proto}, compose {c_proto.get(name)}")
    for extra in (
        (set(c_listen) | set(c_adv) | set(c_proto)) - set(n_listen) - {DOCKER_ONLY_LISTENER}
    ):
        diffs.append(f"kafka listener {extra} exists only in compose")
    volumes = [str(v).split(":", 1)[1] for v in kafka.get("volumes", [])]
    if props.get("log.dirs") not in volumes:
        diffs.append(f"kafka log.dirs {props.get('log.dirs')!r} is not a volume ({volumes})")
    # The host reaches the broker where the native one listens: published port == advertised.
    kafka_ports = published(kafka.get("ports", []))
    host_side = n_adv.get(nprops["inter.broker.listener.name"], ("", 0))
    container_port = c_listen.get(nprops["inter.broker.listener.name"], ("", 0))[1]
    if kafka_ports.get(container_port) != host_side:
        diffs.append(f"kafka published ports {kafka.get('ports')} do not expose {host_side}")
    if len(kafka_ports) != 1:
        diffs.append(f"kafka publishes {sorted(kafka_ports)}; native exposes only {host_side[1]}")

    # ---- Redis
    redis = services.get("redis", {})
    if str(redis.get("image", "")).split(":")[0] != "redis":
        diffs.append(f"redis image {redis.get('image')!r} is not the official redis image")
    args = redis_args([str(a) for a in redis.get("command", [])])
    for key in sorted(set(REDIS_SETTINGS) | set(args)):
        if native.redis_conf.get(key) != args.get(key):
            diffs.append(
                f"redis {key}: native {native.redis_conf.get(key)!r}, compose {args.get(key)!r}"
            )
    redis_ports = published(redis.get("ports", []))
    expected = {native.redis_port: (native.redis_conf.get("bind", "127.0.0.1"), native.redis_port)}
    if redis_ports != expected:
        diffs.append(f"redis published ports {redis.get('ports')} != {expected}")
    if not any(str(v).endswith(":/data") for v in redis.get("volumes", [])):
        diffs.append("redis has no volume on /data (its AOF would die with the container)")
    # healthy as natively (stack.py's redis_ping wants +PONG): `redis-cli ping` exits 0 on
    # an error answer too, so a Redis still loading its AOF (-LOADING) passed, and every
    # service started on it
    if (redis.get("healthcheck") or {}).get("test") != REDIS_HEALTH:
        diffs.append(f"redis healthcheck is not {REDIS_HEALTH} (fails on an error answer)")

    # ---- init steps and Python services: same names, commands, ports, environment
    kafka_in_docker = "{}:{}".format(*c_adv.get(DOCKER_ONLY_LISTENER, ("kafka", 0)))
    to_docker = {
        f"{host_side[0]}:{host_side[1]}": kafka_in_docker,
        f"{expected[native.redis_port][0]}:{native.redis_port}": f"redis:{native.redis_port}",
    }
    # A gRPC service is reached by its container name instead of the host's loopback.
    for spec in native.cfg.services:
        if spec.health is not None and spec.health.kind == "grpc":
            to_docker[f"127.0.0.1:{spec.health.port}"] = f"{spec.name}:{spec.health.port}"

    def translate(envs: dict[str, str]) -> dict[str, str]:
        out = {}
        for key, value in envs.items():
            for local, docker in to_docker.items():
                value = value.replace(local, docker)
            out[key] = value
        return out

    inits = [n for n, r in roles.items() if r == "init"]
    if native.cfg.init:
        if inits != ["init"]:
            diffs.append(f"native has init steps; compose init services are {inits}")
        else:
            init = services["init"]
            want: dict[str, str] = {}
            for step in native.cfg.init:
                want.update(native.cfg.env_for(step.name))
            have = {k: str(v) for k, v in (init.get("environment") or {}).items()}
            if have != translate(want):
                diffs.append(f"init environment: compose {have}, native {translate(want)}")
            if init.get("command") != ["python", "scripts/stack.py", "init"]:
                diffs.append(f"init command {init.get('command')}")
    elif inits:
        diffs.append(f"compose has init services {inits}; native has no init steps")

    components = {c.name: c for c in native.all()}
    for name, role in sorted(roles.items()):
        restart = services[name].get("restart")
        if role in ("infra", "service") and restart != "unless-stopped":
            diffs.append(
                f"{name}: restart {restart!r}, not 'unless-stopped' (the native stack's "
                "supervisor starts again whatever exits)"
            )
        if name in components:  # the time a SIGTERM has before the kill
            grace = seconds(services[name].get("stop_grace_period", DOCKER_STOP_GRACE))
            if grace != components[name].stop_timeout_s:
                diffs.append(
                    f"{name}: stop_grace_period {grace:g}s, native "
                    f"{components[name].stop_timeout_s:g}s"
                )

    native_services = {s.name: s for s in native.cfg.services}
    grpc_ports = {
        s.name: s.health.port
        for s in native.cfg.services
        if s.health is not None and s.health.kind == "grpc"
    }
    compose_services = {n: services[n] for n, r in roles.items() if r == "service"}
    for name in sorted(set(native_services) - set(compose_services)):
        diffs.append(f"service {name} is in scripts/stack.toml but not in docker-compose.yml")
    for name in sorted(set(compose_services) - set(native_services)):
        diffs.append(f"service {name} is in docker-compose.yml but not in scripts/stack.toml")
    for name in sorted(set(native_services) & set(compose_services)):
        spec, svc = native_services[name], compose_services[name]
        command = ["python", "-m", spec.module, *spec.args]
        if svc.get("command") != command:
            diffs.append(f"service {name}: command {svc.get('command')} != {command}")
        want_ports = {p: ("127.0.0.1", p) for p in spec.ports}
        if published(svc.get("ports", [])) != want_ports:
            diffs.append(f"service {name}: ports {svc.get('ports')} != {sorted(spec.ports)}")
        have = {k: str(v) for k, v in (svc.get("environment") or {}).items()}
        want = translate(native.cfg.env_for(name, spec.env))
        # the policy file every stage applies: the caller's (the native supervisor passes
        # its own environment on), mounted into the container
        want["SMARTLEV_STRATEGY_CONFIG"] = "/app/policy.toml"
        if POLICY_MOUNT not in (svc.get("volumes") or []):
            diffs.append(f"service {name}: the caller's policy file is not mounted")
        # A server in a container listens on all its interfaces (its ports published on
        # the host's loopback only); natively on loopback.
        for key in [k for k in want if k.endswith("_GRPC_HOST")]:
            want[key] = "0.0.0.0"
        if f"SMARTLEV_{name.upper()}_METRICS_PORT" in want:
            want[f"SMARTLEV_{name.upper()}_METRICS_HOST"] = "0.0.0.0"
        if have != want:
            diffs.append(f"service {name}: environment {have} != {want}")
        if svc.get("image") != "smartlev:dev" or svc.get("build") != ".":
            diffs.append(f"service {name}: not built from the one Dockerfile (smartlev:dev)")
        # healthy as natively (`up` waits for each), and after what it calls is healthy
        check = ["CMD", "python", "scripts/stack.py", "check", name]
        if spec.health is not None and (svc.get("healthcheck") or {}).get("test") != check:
            diffs.append(f"service {name}: healthcheck is not {check}")
        depends = svc.get("depends_on") or {}
        for other, grpc_port in grpc_ports.items():
            called = any(
                f"127.0.0.1:{grpc_port}" in v for v in native.cfg.env_for(name, spec.env).values()
            )
            if called and (depends.get(other) or {}).get("condition") != "service_healthy":
                diffs.append(f"service {name} calls {other} but does not wait for it healthy")
    return diffs


@pytest.fixture
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_matches_native_stack(compose: dict[str, Any]) -> None:
    assert differences(compose) == []


def _env(name: str, key: str, value: str | None) -> Callable[[dict[str, Any]], None]:
    def mutate(c: dict[str, Any]) -> None:
        if value is None:
            del c["services"][name]["environment"][key]
        else:
            c["services"][name]["environment"][key] = value

    return mutate


def _set(name: str, key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(c: dict[str, Any]) -> None:
        c["services"][name][key] = value

    return mutate


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (_env("kafka", "KAFKA_AUTO_CREATE_TOPICS_ENABLE", "true"), "auto.create.topics.enable"),
        (_env("kafka", "KAFKA_NUM_PARTITIONS", None), "num.partitions"),
        (_env("kafka", "KAFKA_LOG_RETENTION_HOURS", "1"), "log.retention.hours"),
        (_env("kafka", "CLUSTER_ID", "AAAAAAAAAAAAAAAAAAAAAA"), "CLUSTER_ID"),
        (
            _env("kafka", "KAFKA_ADVERTISED_LISTENERS", "PLAINTEXT://localhost:9092"),
            "advertised listener PLAINTEXT",
        ),
        (_set("kafka", "image", "apache/kafka:3.8.0"), "kafka image"),
        (_set("kafka", "ports", ["127.0.0.1:19092:9092"]), "kafka published ports"),
        (
            _set("redis", "command", ["redis-server", "--appendonly", "yes", "--save", ""]),
            "redis appendfsync",
        ),
        (
            _set(
                "redis",
                "command",
                ["redis-server", "--appendonly", "no", "--appendfsync", "everysec", "--save", ""],
            ),
            "redis appendonly",
        ),
        (_set("redis", "ports", ["6379:6379"]), "redis published ports"),
        (_set("redis", "healthcheck", {"test": ["CMD", "redis-cli", "ping"]}), "redis healthcheck"),
        (_set("kafka", "restart", "no"), "kafka: restart 'no', not 'unless-stopped'"),
        (_env("kafka", "KAFKA_OPTS", None), "kafka JVM flag -XX:+ExitOnOutOfMemoryError"),
        (  # the image's defaults are replaced, G1 with them
            _env("kafka", "KAFKA_JVM_PERFORMANCE_OPTS", "-server"),
            "kafka JVM flag -XX:+UseG1GC",
        ),
        (  # Docker's default: killed 10 s after the SIGTERM
            lambda c: c["services"]["kafka"].pop("stop_grace_period"),
            "kafka: stop_grace_period 10s, native 30s",
        ),
        (_set("gateway", "stop_grace_period", "1m"), "gateway: stop_grace_period 60s, native 20s"),
        (_env("init", "SMARTLEV_TOPICS_KAFKA__BOOTSTRAP", "127.0.0.1:9092"), "init environment"),
        (_set("nav", "healthcheck", None), "service nav: healthcheck"),
        (
            lambda c: c["services"]["hedging"]["depends_on"].pop("venue"),
            "service hedging calls venue but does not wait for it healthy",
        ),
        (
            lambda c: c["services"].update(
                extra={"image": "smartlev:dev", "labels": {"smartlev.role": "service"}}
            ),
            "service extra is in docker-compose.yml but not in scripts/stack.toml",
        ),
    ],
)
def test_a_doctored_compose_file_is_caught(
    compose: dict[str, Any], mutate: Callable[[dict[str, Any]], None], expected: str
) -> None:
    doctored = copy.deepcopy(compose)
    mutate(doctored)
    found = differences(doctored)
    assert any(expected in d for d in found), found


SERVICE = """
[[services]]
name = "example"
module = "services.example"
ports = [9199]
env = { SMARTLEV_EXAMPLE_METRICS_PORT = "9199" }
health = { kind = "http", port = 9199, path = "/healthz" }
"""


def test_a_service_declared_on_one_side_only_is_caught(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    config = tmp_path / "stack.toml"
    config.write_text(runner.CONFIG.read_text() + SERVICE)
    assert "service example is in scripts/stack.toml but not in docker-compose.yml" in (
        differences(compose, config)
    )

    # Declared on both sides, as docker-compose.yml's note shows: no difference...
    both = copy.deepcopy(compose)
    both["services"]["example"] = {
        **compose["x-python-service"],
        "command": ["python", "-m", "services.example"],
        "healthcheck": {
            **compose["x-service-health"],
            "test": ["CMD", "python", "scripts/stack.py", "check", "example"],
        },
        "ports": ["127.0.0.1:9199:9199"],
        "environment": {
            "SMARTLEV_STRATEGY_CONFIG": "/app/policy.toml",
            "SMARTLEV_EXAMPLE_KAFKA__BOOTSTRAP": "kafka:29092",
            "SMARTLEV_EXAMPLE_REDIS__URL": "redis://redis:6379/0",
            "SMARTLEV_EXAMPLE_METRICS_HOST": "0.0.0.0",
            "SMARTLEV_EXAMPLE_METRICS_PORT": "9199",
        },
    }
    assert differences(both, config) == []

    # ...until the environment drifts.
    both["services"]["example"]["environment"]["SMARTLEV_EXAMPLE_METRICS_PORT"] = "9198"
    assert any("service example: environment" in d for d in differences(both, config))


def test_env_names_map_to_kafka_properties() -> None:
    assert env_to_property("KAFKA_LOG_DIRS") == "log.dirs"
    assert env_to_property("KAFKA_TRANSACTION_STATE_LOG_MIN_ISR") == "transaction.state.log.min.isr"
    assert env_to_property("KAFKA_SOME__UNDER___DASH") == "some_under-dash"


def test_every_container_keeps_a_bounded_log(compose: dict[str, Any]) -> None:
    """Docker's json-file driver keeps a container's whole log unless told otherwise;
    the native stack keeps a launch's log and the one before it."""
    for name, service in compose["services"].items():
        logging = service.get("logging") or {}
        options = logging.get("options") or {}
        assert logging.get("driver") == "json-file" and options.get("max-size"), name
        assert int(options.get("max-file", "1")) >= 1, name
