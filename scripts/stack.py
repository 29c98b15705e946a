#!/usr/bin/env python3
"""The local stack, run natively: Apache Kafka (KRaft), Redis and the Python services.

Usage (normally through scripts/stack.sh / make):
    stack.py up | down | ps | logs [NAME...] [-n N] [--no-follow]
    stack.py restart NAME | stop NAME | restart-kafka | restart-redis | init | check NAME

What runs is declared in scripts/stack.toml; Kafka's and Redis's settings are in
scripts/kafka/server.properties and scripts/redis/redis.conf. Everything this script
starts runs from the project root in its own session, logs to .run/<name>.log and has
its pid in .run/<name>.pid, so `up` is idempotent and `down` stops exactly what `up`
started. `up` also starts a supervisor (`stack.py supervise`, .run/supervisor.log) that
starts again whatever exits, as docker-compose's `restart: unless-stopped` does, backing
off while a component keeps failing; `stop NAME` holds one component down until the next
`up` or `restart NAME`. Standard library only at import time (kafka-python is imported for the Kafka
health check), so the Docker image can run `stack.py init` too.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, scripts/ is sys.path[0], and scripts/kafka/ (the pom) would shadow the
# kafka-python package as a namespace package for tools; nothing here is imported from it.
if sys.path and Path(sys.path[0]).resolve() == ROOT / "scripts":
    sys.path.pop(0)
CONFIG = ROOT / "scripts" / "stack.toml"
HOST = "127.0.0.1"


class StackError(Exception):
    """Something the user has to fix; printed without a traceback."""


def say(msg: str) -> None:
    print(f"==> {msg}", flush=True)


def run_logged(cmd: list[str], log: Path, what: str, every_s: float = 10.0, **kw: Any) -> int:
    """Run `cmd` with its output appended to `log`, saying every `every_s` that it still
    runs and what it last wrote (a first setup's downloads take minutes)."""
    began = time.monotonic()
    with log.open("a") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, **kw)
        while True:
            try:
                return proc.wait(timeout=every_s)
            except subprocess.TimeoutExpired:
                last = tail(log, 1).strip()[:90]
                print(f"    ... {what}: {time.monotonic() - began:.0f} s; {last}", flush=True)


def warn(msg: str) -> None:
    print(f"WARNING: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- config files


def read_properties(path: Path) -> dict[str, str]:
    """A Java .properties file as a dict (the simple `key=value` subset Kafka configs use)."""
    props: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", "!")):
            continue
        key, _, value = line.partition("=")
        props[key.strip()] = value.strip()
    return props


def read_redis_conf(path: Path) -> dict[str, str]:
    """redis.conf directives as a dict (`directive value...`; quotes stripped)."""
    conf: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        conf[key.lower()] = value.strip().strip('"')
    return conf


def kafka_version(pom: Path) -> str:
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    node = ET.parse(pom).getroot().find("m:properties/m:kafka.version", ns)
    if node is None or not (node.text or "").strip():
        raise StackError(f"{pom}: no <kafka.version> property")
    return (node.text or "").strip()


def listener_port(url: str) -> int:
    """`PLAINTEXT://127.0.0.1:9092` -> 9092."""
    return int(url.rsplit(":", 1)[1])


@dataclass(frozen=True)
class Health:
    kind: str  # "tcp" | "http" | "grpc"
    port: int
    path: str = "/healthz"


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    module: str
    args: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    health: Health | None = None
    start_timeout_s: float = 30.0


@dataclass(frozen=True)
class InitSpec:
    name: str
    module: str
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class StackConfig:
    raw: dict[str, Any]
    env_template: dict[str, str]
    init: tuple[InitSpec, ...]
    services: tuple[ServiceSpec, ...]

    def env_for(self, name: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The declared environment of one init step or service (before the caller's env)."""
        env = {k.replace("{NAME}", name.upper()): v for k, v in self.env_template.items()}
        env.update(extra or {})
        return env


def load_config(path: Path = CONFIG) -> StackConfig:
    raw = tomllib.loads(path.read_text())
    init = tuple(
        InitSpec(name=s["name"], module=s["module"], args=tuple(s.get("args", [])))
        for s in raw.get("init", [])
    )
    services = []
    for s in raw.get("services", []):
        health = Health(**s["health"]) if "health" in s else None
        services.append(
            ServiceSpec(
                name=s["name"],
                module=s["module"],
                args=tuple(str(a) for a in s.get("args", [])),
                ports=tuple(s.get("ports", [])),
                env={k: str(v) for k, v in s.get("env", {}).items()},
                health=health,
                start_timeout_s=float(s.get("start_timeout_s", 30)),
            )
        )
    names = [s.name for s in services] + ["kafka", "redis"]
    if len(set(names)) != len(names):
        raise StackError(f"{path}: duplicate component names in {names}")
    return StackConfig(
        raw=raw,
        env_template={k: str(v) for k, v in raw.get("env", {}).items()},
        init=init,
        services=tuple(services),
    )


# --------------------------------------------------------------------------- processes, ports


def _proc_stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat's fields after the command name (from field 3, the state), or
    None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()


def _proc_state(pid: int) -> str | None:
    """The one-letter state of a process, or None if there is no such process."""
    fields = _proc_stat(pid)
    return None if fields is None else fields[0]


def started_at(pid: int) -> float | None:
    """When a process started (seconds since the epoch), or None if there is none: now
    less its age by the kernel's clock (/proc/stat's boot time is whole seconds), two
    ticks late at most, so a process is never taken for older than it is."""
    fields = _proc_stat(pid)
    if fields is None:
        return None
    hz = os.sysconf("SC_CLK_TCK")
    ticks = int(fields[19])  # field 22: starttime
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return time.time() - (uptime - ticks / hz) + 2 / hz


def pid_alive(pid: int) -> bool:
    state = _proc_state(pid)
    return state is not None and state not in ("Z", "X")  # a zombie has already exited


STACK_MARKER = "SMARTLEV_STACK_ROOT"


def pid_environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def pid_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def pid_comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def pid_cwd(pid: int) -> Path | None:
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return None


def describe_pid(pid: int) -> str:
    cmd = " ".join(pid_cmdline(pid)) or "?"
    return cmd if len(cmd) <= 120 else cmd[:117] + "..."


def listener_pids(port: int) -> list[int]:
    """Pids of processes with a listening TCP socket on `port` (any address), via /proc."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                local, state, inode = cols[1], cols[3], cols[9]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{inode}]")
    pids: list[int] = []
    if not inodes:
        return pids
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in inodes:
                        pids.append(int(proc.name))
                        break
    return sorted(pids)


def port_open(port: int, host: str = HOST, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def port_holder(port: int) -> str | None:
    """Who listens on `port`, as `pid N (cmd)`, or None if nobody does."""
    pids = listener_pids(port)
    if pids:
        return ", ".join(f"pid {p} ({describe_pid(p)})" for p in pids)
    if port_open(port):
        return "an unknown process (not visible in /proc)"
    return None


def check_port_free(port: int, component: str) -> None:
    """Fail at once, naming the holder, if `port` is already taken (no waiting, no retry)."""
    holder = port_holder(port)
    if holder:
        raise StackError(
            f"port {port} (needed by {component}) is in use by {holder}; stop it (if it is "
            "another checkout's stack: `bash scripts/stack.sh down` there; Debian's own "
            "redis-server service: `sudo systemctl disable --now redis-server`) and re-run"
        )


def _redis_reply(port: int, command: bytes, host: str, timeout: float, size: int) -> bytes:
    """Redis's reply to one inline `command` (OSError if there is no Redis to ask)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(command + b"\r\n")
        return sock.recv(size)


LOADING = "loading its data"  # redis_ping's reason while a started Redis reads its files
LOADING_TIMES = 20  # a loading Redis is waited for up to this many start timeouts


def redis_ping(port: int, host: str = HOST, timeout: float = 1.0) -> str | None:
    """None if Redis answers PING with PONG, else why not (LOADING first while it reads
    its data back: it is coming up, however long that takes)."""
    try:
        reply = _redis_reply(port, b"PING", host, timeout, 128)
    except OSError as exc:
        return f"no connection ({exc.strerror or exc})"
    if reply.startswith(b"+PONG"):
        return None
    answered = reply.decode(errors="replace").strip()
    return f"{LOADING} ({answered!r})" if reply.startswith(b"-LOADING") else f"PING: {answered!r}"


def redis_durable(port: int, host: str = HOST, timeout: float = 1.0) -> bool:
    """Whether the Redis on `port` keeps every write as ours does: logs it (appendonly
    yes) and never evicts a key to make room (maxmemory-policy noeviction: one that
    evicts drops positions and idempotency records when full)."""
    try:
        logged = _redis_reply(port, b"CONFIG GET appendonly", host, timeout, 256)
        policy = _redis_reply(port, b"CONFIG GET maxmemory-policy", host, timeout, 256)
    except OSError:
        return False
    return logged.endswith(b"\r\nyes\r\n") and policy.endswith(b"\r\nnoeviction\r\n")


def kafka_metadata(bootstrap: str, timeout_ms: int = 3000) -> str | None:
    """None if the broker answers a metadata request (kafka-python), else why not."""
    quiet = logging.getLogger("kafka")
    quiet.propagate = False  # kafka-python logs every refused connection as an error
    if not quiet.handlers:
        quiet.addHandler(logging.NullHandler())
    try:
        from kafka import KafkaAdminClient
    except ImportError:
        return "kafka-python is not installed (run `make setup`)"
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap,
            client_id="smartlev-stack",
            request_timeout_ms=timeout_ms,
            bootstrap_timeout_ms=timeout_ms,
        )
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    try:
        cluster = admin.describe_cluster()
        if not cluster.get("brokers"):
            return "metadata has no brokers yet"
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(Exception):
            admin.close()


def http_health(port: int, path: str) -> str | None:
    """None when healthy; else why: the failing checks a service's 503 body names."""
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=5) as resp:
            return None if resp.status == 200 else f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        with contextlib.suppress(ValueError, AttributeError, OSError):
            checks = json.loads(exc.read()).get("checks", {})
            failing = [f"{n}: {c.get('detail')}" for n, c in checks.items() if not c.get("ok")]
            if failing:
                return f"HTTP {exc.code}, " + "; ".join(failing)
        return f"HTTP {exc.code}"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def grpc_health(port: int) -> str | None:
    try:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc
    except ImportError:
        return "grpcio-health-checking is not installed (run `make setup`)"
    try:
        with grpc.insecure_channel(f"{HOST}:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    serving = health_pb2.HealthCheckResponse.SERVING
    return None if reply.status == serving else f"gRPC health status {reply.status}"


def rel(path: Path) -> str:
    """A path for messages: relative to the project root when it is inside it."""
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


TAIL_BYTES = 64 * 1024  # what `tail` reads of a log: its end, however long the log
LOG_KEPT_BYTES = 64 * 1024 * 1024  # a longer log is moved to <name>.log.1 at a launch


def tail(path: Path, lines: int = 20) -> str:
    """The log's last `lines` lines, read from its end (a broker's log can be gigabytes)."""
    try:
        with path.open("rb") as log:
            size = log.seek(0, os.SEEK_END)
            log.seek(max(size - TAIL_BYTES, 0))
            text = log.read().decode(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text[-lines:])


def rotate(log: Path) -> None:
    """Keep one launch's log and the one before it when it grew past LOG_KEPT_BYTES (a
    component appends at every launch; the broker ran for days and wrote gigabytes)."""
    with contextlib.suppress(FileNotFoundError):
        if log.stat().st_size > LOG_KEPT_BYTES:
            log.replace(log.with_name(log.name + ".1"))


def rotate_running(log: Path, limit: int | None = None) -> bool:
    """Copy a running component's log to <name>.log.1 and empty it once it grew past
    `limit` (the supervisor's round): a component up for months no longer writes one
    growing file. The process keeps its descriptor, opened for appending, so it writes
    on from the start of the emptied file; what it writes between the copy and the
    emptying (a few milliseconds) is lost, as with logrotate's copytruncate."""
    try:
        if log.stat().st_size <= (LOG_KEPT_BYTES if limit is None else limit):
            return False
    except FileNotFoundError:
        return False
    with log.open("rb") as source, log.with_name(log.name + ".1").open("wb") as copy:
        shutil.copyfileobj(source, copy)
    os.truncate(log, 0)
    return True


def read_record(record: Path) -> str | None:
    """A digest `up` recorded (`.run/*.sha256`), or None if none was."""
    return record.read_text().strip() if record.exists() else None


def content_digest(paths: Iterable[Path], root: Path, also: bytes = b"") -> str:
    """sha256 of the files' paths (relative to `root`) and contents, then `also`; a
    missing file counts as missing. What changed is content, not a modification time: a
    file stamped in the future, or new code with an old one (rsync -t, an unpacked
    archive), is seen as it is."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(os.path.relpath(path, root).encode() + b"\0")
        digest.update(path.read_bytes() if path.is_file() else b"(missing)")
        digest.update(b"\0")
    digest.update(also)
    return digest.hexdigest()


# --------------------------------------------------------------------------- components


@dataclass
class Component:
    """One background process the stack owns."""

    name: str
    ports: tuple[int, ...]
    argv: Callable[[], list[str]]
    health: Callable[[], str | None]  # None = healthy, else the reason it is not
    owns: Callable[[int], bool]  # is this pid our process (guards against pid reuse)?
    start_timeout_s: float
    stop_timeout_s: float = 20.0
    env: dict[str, str] = field(default_factory=dict)
    prepare: Callable[[], None] = lambda: None  # before start: install, fetch, format...
    # Something not started by us already serves the port and is usable as is (Redis only).
    external_ok: Callable[[], bool] | None = None
    # The content of the code it runs (services): recorded at each launch, so `up` knows
    # whether what runs is what is on disk.
    code: Callable[[], str] | None = None


class Stack:
    def __init__(self, root: Path = ROOT, config: Path = CONFIG, run_dir: Path | None = None):
        self.root = root
        self.config_path = config
        self.cfg = load_config(config)
        # the declarations as loaded: what this runner launches with, however the file
        # changes while it runs (a supervisor runs for days)
        self.declared = config.read_bytes()
        self.run = run_dir or root / ".run"
        k, r = self.cfg.raw.get("kafka", {}), self.cfg.raw.get("redis", {})
        self.kafka_cfg, self.redis_cfg = k, r
        # Kafka's and Redis's own config files (their ports: how the stack knows them)
        self.kafka_config, self.redis_config = root / k["config"], root / r["config"]
        self.kafka_props = read_properties(self.kafka_config)
        self.redis_conf = read_redis_conf(self.redis_config)
        self.kafka_port = listener_port(self.kafka_props["advertised.listeners"].split(",")[0])
        self.controller_port = next(
            listener_port(u)
            for u in self.kafka_props["listeners"].split(",")
            if u.startswith(self.kafka_props["controller.listener.names"] + "://")
        )
        self.redis_port = int(self.redis_conf.get("port", "6379"))
        self.kafka_version = kafka_version(root / k["pom"])
        self.kafka_libs = root / ".cache" / "kafka" / self.kafka_version / "libs"
        self.external: set[str] = set()  # components served by a process we did not start
        # what this run launched: the process and its monotonic start time
        self.launched: dict[str, tuple[subprocess.Popen[bytes], float]] = {}

    # ---- component definitions

    def kafka(self) -> Component:
        config = self.kafka_config
        return Component(
            name="kafka",
            ports=(self.kafka_port, self.controller_port),
            argv=lambda: [
                java_bin(),
                "-Xms128m",
                f"-Xmx{self.kafka_cfg.get('heap', '512m')}",
                "-XX:+UseG1GC",
                "-XX:MaxGCPauseMillis=20",
                "-XX:+ExitOnOutOfMemoryError",
                "-Djava.awt.headless=true",
                f"-Dlog4j.configuration=file:{self.root / self.kafka_cfg['log4j']}",
                f"-Dkafka.logs.dir={self.run}",
                "-cp",
                f"{self.kafka_libs}/*",
                "kafka.Kafka",
                str(config),
            ],
            health=lambda: kafka_metadata(f"{HOST}:{self.kafka_port}"),
            owns=lambda pid: "kafka.Kafka" in pid_cmdline(pid) and str(config) in pid_cmdline(pid),
            start_timeout_s=float(self.kafka_cfg.get("start_timeout_s", 60)),
            stop_timeout_s=30.0,  # a controlled shutdown flushes logs; give it time
            prepare=self._prepare_kafka,
        )

    def _our_redis(self, pid: int, data_dir: Path, config: Path) -> bool:
        """Redis moves into its data dir while it reads its config (`dir`), and rewrites
        its process title ("redis-server 127.0.0.1:6379") only once it has set itself up,
        milliseconds later. So ours is a redis-server that still has our config in its
        command line (wherever it stands: in that window it is in the data dir with its
        first title), or sits in our data dir with our port in its title: another one started
        from the checkout (on any port, ours too) is not ours, and `up` does not adopt it
        unchecked nor `down` kill it."""
        if pid_comm(pid) != "redis-server":
            return False
        argv = pid_cmdline(pid)
        if str(config) in argv:
            return True
        cmdline = " ".join(argv)
        return pid_cwd(pid) == data_dir and re.search(rf":{self.redis_port}\b", cmdline) is not None

    def redis(self) -> Component:
        data_dir = (self.root / self.redis_conf["dir"]).resolve()
        config = self.redis_config
        return Component(
            name="redis",
            ports=(self.redis_port,),
            argv=lambda: [shutil.which("redis-server") or "redis-server", str(config)],
            health=lambda: redis_ping(self.redis_port),
            owns=lambda pid: self._our_redis(pid, data_dir, config),
            start_timeout_s=float(self.redis_cfg.get("start_timeout_s", 15)),
            prepare=lambda: self._prepare_redis(data_dir),
            # a Redis someone else runs is used only if it keeps positions across its
            # restarts: Debian's own redis-server service (no AOF) is not
            external_ok=lambda: (
                redis_ping(self.redis_port) is None and redis_durable(self.redis_port)
            ),
        )

    def service(self, spec: ServiceSpec) -> Component:
        argv = [sys.executable, "-m", spec.module, *spec.args]

        def health() -> str | None:
            h = spec.health
            if h is None:
                return None
            if h.kind == "tcp":
                return None if port_open(h.port) else f"port {h.port} not open"
            if h.kind == "http":
                return http_health(h.port, h.path)
            if h.kind == "grpc":
                return grpc_health(h.port)
            return f"unknown health kind {h.kind!r}"

        def prepare() -> None:
            if not module_exists(spec.module, self.root):
                raise StackError(
                    f"service {spec.name}: module {spec.module} not found "
                    f"(declared in {CONFIG.relative_to(ROOT)})"
                )

        return Component(
            name=spec.name,
            ports=spec.ports,
            argv=lambda: argv,
            health=health,
            # The marker tells our service from a test's pipeline running the same module.
            owns=lambda pid: (
                pid_cmdline(pid)[1:3] == ["-m", spec.module]
                and pid_cwd(pid) == self.root
                and pid_environ(pid).get(STACK_MARKER) == str(self.root)
            ),
            start_timeout_s=spec.start_timeout_s,
            env={
                "PYTHONUNBUFFERED": "1",
                STACK_MARKER: str(self.root),
                **self.cfg.env_for(spec.name, spec.env),
            },
            prepare=prepare,
            code=self.code_digest,
        )

    def infra(self) -> list[Component]:
        return [self.redis(), self.kafka()]

    def services(self) -> list[Component]:
        return [self.service(s) for s in self.cfg.services]

    def all(self) -> list[Component]:
        return self.infra() + self.services()

    def by_name(self, name: str) -> Component:
        for comp in self.all():
            if comp.name == name:
                return comp
        raise StackError(f"no component named {name!r} (have: {[c.name for c in self.all()]})")

    # ---- one-time preparation

    def _prepare_redis(self, data_dir: Path) -> None:
        ensure_apt_packages()
        data_dir.mkdir(parents=True, exist_ok=True)

    def _prepare_kafka(self) -> None:
        self.fetch_kafka()
        data = self.root / self.kafka_props["log.dirs"].split(",")[0]
        meta = data / "meta.properties"
        cluster_id = self.kafka_cfg["cluster_id"]
        if meta.exists():
            found = read_properties(meta).get("cluster.id")
            if found != cluster_id:
                raise StackError(
                    f"{data} belongs to Kafka cluster {found}, not {cluster_id}; "
                    f"remove it (rm -rf {data}) to start with empty topics"
                )
            return
        say(f"formatting Kafka storage in {rel(data)} (cluster id {cluster_id})")
        data.mkdir(parents=True, exist_ok=True)
        log = self.run / "kafka-format.log"
        cmd = [
            java_bin(),
            f"-Dlog4j.configuration=file:{self.root / self.kafka_cfg['log4j']}",
            "-cp",
            f"{self.kafka_libs}/*",
            "kafka.tools.StorageTool",
            "format",
            "--ignore-formatted",
            "-t",
            cluster_id,
            "-c",
            str(self.kafka_config),
        ]
        with log.open("w") as out:
            rc = subprocess.call(cmd, cwd=self.root, stdout=out, stderr=subprocess.STDOUT)
        if rc != 0:
            raise StackError(
                f"formatting Kafka storage failed (exit {rc}); see {log}:\n{tail(log)}"
            )

    def fetch_kafka(self) -> None:
        """Kafka broker jars from Maven Central into .cache/kafka/<version>/libs, once per
        version of the pom (its hash is the stamp: a dependency bumped there, say for a CVE,
        is fetched, not left at the jars of before). Checksums are strict: a corrupt
        artifact in ~/.m2 fails the fetch instead of being trusted from then on."""
        stamp = self.kafka_libs.parent / ".complete"
        pom = self.root / self.kafka_cfg["pom"]
        wanted = hashlib.sha256(pom.read_bytes()).hexdigest()
        if stamp.exists() and stamp.read_text().strip() == wanted:
            if not has_java():  # jars from a cache, on a machine without Java
                ensure_java_and_maven()
            return
        say(f"fetching Kafka {self.kafka_version} jars from Maven Central (once per pom version)")
        ensure_java_and_maven()
        tmp = self.kafka_libs.with_name("libs.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        log = self.run / "maven.log"
        cmd = [
            "mvn",
            "-B",
            "-C",
            "-f",
            str(pom),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={tmp}",
        ]
        log.write_text("")
        rc = run_logged(cmd, log, "Maven", cwd=self.root)
        if rc != 0 or not (tmp / f"kafka_2.13-{self.kafka_version}.jar").exists():
            if (self.kafka_libs / f"kafka_2.13-{self.kafka_version}.jar").exists():
                # Kafka starts on the jars of before; the next `up` fetches again (no stamp)
                say(f"fetching new Kafka jars failed (see {log}); starting on the ones before")
                return
            raise StackError(f"fetching Kafka jars with Maven failed; see {log}:\n{tail(log)}")
        # only a complete download is ever used, and the jars of before stay until then
        # (deleted first, a fetch Maven Central failed left Kafka no jars to start on)
        shutil.rmtree(self.kafka_libs, ignore_errors=True)
        tmp.rename(self.kafka_libs)
        stamp.write_text(f"{wanted}\n")

    # ---- pid files

    def pid_file(self, comp: Component) -> Path:
        return self.run / f"{comp.name}.pid"

    def log_file(self, name: str) -> Path:
        return self.run / f"{name}.log"

    def running_pid(self, comp: Component) -> int | None:
        """The pid of our live process for `comp`, or None (a stale pid file is removed).

        A process of ours that lost its pid file (say .run/*.pid was deleted) is adopted.
        """
        path = self.pid_file(comp)
        try:
            pid = int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pid = 0
        if pid and pid_alive(pid) and comp.owns(pid):
            return pid
        path.unlink(missing_ok=True)
        strays = self.strays(comp)
        if len(strays) == 1 and path.parent.is_dir():
            path.write_text(f"{strays[0]}\n")
            return strays[0]
        return None

    def strays(self, comp: Component) -> list[int]:
        """Our processes for `comp` that no pid file points at (e.g. a deleted .run/)."""
        found = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit() and int(proc.name) != os.getpid():
                pid = int(proc.name)
                with contextlib.suppress(OSError):
                    if pid_alive(pid) and comp.owns(pid):
                        found.append(pid)
        return found

    # ---- start / wait / stop

    def launch(self, comp: Component) -> int | None:
        """Start `comp` unless it already runs; returns the new pid, or None if it ran."""
        self.launched.pop(comp.name, None)  # a process of an earlier launch is not this one
        pid = self.running_pid(comp)
        if pid is not None:
            say(f"{comp.name} already running (pid {pid})")
            return None
        strays = self.strays(comp)
        if strays:
            raise StackError(
                f"{comp.name} runs more than once (pids {', '.join(map(str, strays))}); "
                f"run `bash scripts/stack.sh down` first"
            )
        holder = port_holder(comp.ports[0]) if comp.ports else None
        if holder and comp.external_ok is not None and comp.external_ok():
            warn(
                f"{comp.name}: port {comp.ports[0]} is already served by {holder}, which "
                f"stack.sh did not start; using it as is (its persistence settings are its own, "
                f"restart-{comp.name} will refuse). To run ours instead, stop it "
                f"(Debian's: `service redis-server stop`) and run `make up` again."
            )
            self.external.add(comp.name)
            self.external_file(comp.name).write_text(f"{holder}\n")
            return None
        for port in comp.ports:
            check_port_free(port, comp.name)
        self.external_file(comp.name).unlink(missing_ok=True)
        comp.prepare()
        if comp.code is not None:
            self.code_record(comp).write_text(f"{comp.code()}\n")
        log = self.log_file(comp.name)
        rotate(log)
        env = {**comp.env, **os.environ} if comp.env else dict(os.environ)
        with log.open("a") as out:
            out.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} stack.sh starts {comp.name}\n")
            out.flush()
            proc = subprocess.Popen(
                comp.argv(),
                cwd=self.root,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: `down` signals the whole group
            )
        self.pid_file(comp).write_text(f"{proc.pid}\n")
        self.launched[comp.name] = (proc, time.monotonic())
        say(f"started {comp.name} (pid {proc.pid}, log {rel(log)})")
        return proc.pid

    def wait_healthy(self, comp: Component, quiet: bool = False) -> None:
        if comp.name in self.external:
            return
        log = self.log_file(comp.name)
        child, started = self.launched.get(comp.name, (None, time.monotonic()))
        deadline = started + comp.start_timeout_s
        reason: str | None = "not checked yet"
        while True:
            # One we launched is watched as our child: until its exec and its own start-up
            # are done, its name and command line are not yet what `owns` knows it by (on a
            # fresh clone, the first check found Redis still named "python").
            gone = child.poll() is not None if child else self.running_pid(comp) is None
            if gone:
                raise StackError(f"{comp.name} exited during start-up; see {log}:\n{tail(log)}")
            if all(port_open(p) for p in comp.ports):
                reason = comp.health()
                if reason is None:
                    if not quiet:
                        say(f"{comp.name} is healthy ({time.monotonic() - started:.1f} s)")
                    return
            else:
                reason = "ports " + ",".join(map(str, comp.ports)) + " not all open yet"
            if reason is not None and reason.startswith(LOADING):
                # alive and reading its data back: a large AOF takes longer than the start
                # timeout (stopped at it, it never came back: the supervisor retried alike),
                # so up to LOADING_TIMES of it, saying so
                if deadline < time.monotonic() + 1 and not quiet:
                    say(f"{comp.name} is {LOADING}; waiting for it")
                longest = started + LOADING_TIMES * comp.start_timeout_s
                deadline = min(max(deadline, time.monotonic() + 5), longest)
            if time.monotonic() > deadline:
                self.stop(comp, quiet=True)
                raise StackError(
                    f"{comp.name} did not come up within {comp.start_timeout_s:.0f} s "
                    f"(last check: {reason}); stopped it. See {log}:\n{tail(log)}"
                )
            time.sleep(0.3)

    def stop(self, comp: Component, quiet: bool = False) -> None:
        pids = ([p] if (p := self.running_pid(comp)) else []) + self.strays(comp)
        child, _ = self.launched.get(comp.name, (None, 0.0))
        if child is not None and child.poll() is None:  # launched, maybe not recognized yet
            pids.append(child.pid)
        pids = sorted(set(pids))
        if not pids:
            if not quiet:
                say(f"{comp.name} not running")
            self.pid_file(comp).unlink(missing_ok=True)
            return
        for sig, wait_s in ((signal.SIGTERM, comp.stop_timeout_s), (signal.SIGKILL, 5.0)):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, sig)  # its session/group: takes children along
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
                time.sleep(0.2)
            if not any(pid_alive(p) for p in pids):
                break
            warn(f"{comp.name} (pid {pids}) ignored SIGTERM for {wait_s:.0f} s; sending SIGKILL")
        alive = [p for p in pids if pid_alive(p)]
        if alive:
            raise StackError(f"could not stop {comp.name} (pid {alive})")
        # A killed JVM's listening sockets can outlive its /proc entry for a moment (seen
        # after a SIGKILL of Kafka): a restart right away would find its own ports taken.
        deadline = time.monotonic() + 15.0
        while time.monotonic() < deadline and any(port_open(port) for port in comp.ports):
            time.sleep(0.2)
        self.pid_file(comp).unlink(missing_ok=True)
        if not quiet:
            say(f"stopped {comp.name} (pid {', '.join(map(str, pids))})")

    # ---- commands

    def up(self) -> None:
        t0 = time.monotonic()
        self.run.mkdir(parents=True, exist_ok=True)
        ensure_apt_packages()
        redis, kafka = self.redis(), self.kafka()
        self.stop_reconfigured([(kafka, self.kafka_files()), (redis, [self.redis_config])])
        # Kafka first (its first run fetches jars), then Redis, so both start side by side.
        launched = [c.name for c in (kafka, redis) if self.launch(c) is not None]
        for comp in (redis, kafka):
            self.wait_healthy(comp, quiet=comp.name not in launched)
        self.run_init()
        services = self.services()
        if not services:
            say(f"no Python services declared yet ({CONFIG.relative_to(ROOT)})")
        self.stop_stale(services)
        launched += [c.name for c in services if self.launch(c) is not None]
        for comp in services:
            self.wait_healthy(comp, quiet=comp.name not in launched)
        state = "started" if launched else "already running"
        say(
            f"stack is up ({state}; {time.monotonic() - t0:.1f} s): "
            f"kafka {HOST}:{self.kafka_port}, redis {HOST}:{self.redis_port}"
            + "".join(f", {c.name}" for c in services)
        )

    def stop_stale(self, services: list[Component]) -> None:
        """Stop the services whose code changed since they started (a `git pull`, an
        edit, new pinned packages or generated code), so `up` starts them on the code as
        it is: left running, the gateway served the old code, and a supervisor restart of
        one service put new code beside old peers. Changed means other content than
        their launch recorded (`.run/<name>.code.sha256`, `code_digest`), not a newer
        mtime: new code with old mtimes went unseen, and a file stamped in the future
        restarted them on every `up`. With no record (started before records were
        kept), code newer than the process counts as changed, once."""
        current = self.code_digest()
        for comp in services:
            record = self.code_record(comp)
            self._stop_if_changed(comp, record, current, self.code_changed_at, "its code")
            if self.running_pid(comp) is not None:
                record.write_text(f"{current}\n")  # what it runs on, as of now

    def kafka_files(self) -> list[Path]:
        """What the broker runs on besides its command line: its config, its logging
        config and the pom that pins its jars (a version or a dependency bumped there)."""
        return [
            self.kafka_config,
            self.root / self.kafka_cfg["log4j"],
            self.root / self.kafka_cfg["pom"],
        ]

    def stop_reconfigured(self, configured: list[tuple[Component, list[Path]]]) -> None:
        """Stop Kafka or Redis (ours only) if what it runs on changed since it started
        (its files, and its command line: a heap, a jar version), so `up` starts it on
        them as they are: each reads them once, and a changed setting (a retention, an
        fsync policy) or a pom bumped for a CVE waited for a restart nothing gave it.
        Changed means other content than `up` last started or found it on (recorded in
        `.run/<name>.config.sha256`), not a newer mtime: a file stamped in the future
        restarted the broker on every `up`. With no record (a component started before
        records were kept), a file newer than the process counts as changed, once."""
        for comp, files in configured:
            # the command line after its program: where `java` is found moves when the
            # first `up` installs it, or with JAVA_HOME, and restarted the broker for it
            digest = content_digest(files, self.root, "\0".join(comp.argv()[1:]).encode())
            record = self.run / f"{comp.name}.config.sha256"

            def newest(files: list[Path] = files) -> float:
                return max(os.path.getmtime(f) for f in files if f.exists())

            self._stop_if_changed(comp, record, digest, newest, "its config")
            record.write_text(f"{digest}\n")  # what it runs on once `up` starts it

    def _stop_if_changed(
        self,
        comp: Component,
        record: Path,
        digest: str,
        changed_at: Callable[[], float],
        what: str,
    ) -> None:
        """Stop `comp` if it runs on other content than `digest` (its `record`); with no
        record (started before records were kept), if it started before `changed_at()`."""
        recorded = read_record(record)
        if recorded is None:
            self._stop_if_older(comp, changed_at(), what)
        elif recorded != digest:
            self._stop_if_running(comp, what)

    def _stop_if_older(self, comp: Component, changed: float, what: str) -> None:
        pid = self.running_pid(comp)
        began = None if pid is None else started_at(pid)
        if began is not None and began < changed:
            self._stop_changed(comp, what)

    def _stop_if_running(self, comp: Component, what: str) -> None:
        if self.running_pid(comp) is not None:
            self._stop_changed(comp, what)

    def _stop_changed(self, comp: Component, what: str) -> None:
        say(f"{comp.name}: {what} changed since it started; restarting it")
        self.stop(comp, quiet=True)

    def code_record(self, comp: Component) -> Path:
        return self.run / f"{comp.name}.code.sha256"

    def code_paths(self) -> list[Path]:
        """What the services run besides their declarations: their sources and the files
        beside them (the gateway's API keys), the generated code, and the pinned packages
        the venv is built from."""
        paths = [
            p
            for d in ("services", "shared")
            for p in (self.root / d).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        ]
        paths += (self.root / "gen").rglob("*.py")
        return [*paths, self.root / "requirements.lock", self.root / "pyproject.toml"]

    def code_digest(self) -> str:
        """`code_paths` as they are and the declarations as this runner loaded them: a
        supervisor started on older declarations relaunches a service on those, and its
        record must say so."""
        return content_digest(self.code_paths(), self.root, also=self.declared)

    def code_changed_at(self) -> float:
        """When the services' code last changed (for a service started before `up`
        recorded digests): `code_paths`, the declarations, and the venv's and generated
        code's stamps."""
        paths = [
            *self.code_paths(),
            self.config_path,
            self.root / ".venv" / ".installed",
            self.root / "gen" / ".generated",
        ]
        return max((p.stat().st_mtime for p in paths if p.exists()), default=0.0)

    def run_init(self, to_console: bool = False) -> None:
        """The init steps; output to .run/init-<name>.log (or the console, e.g. in Docker)."""
        for step in self.cfg.init:
            if not module_exists(step.module, self.root):
                say(f"init {step.name}: skipped ({step.module} does not exist yet)")
                continue
            log = self.log_file(f"init-{step.name}")
            env = {**self.cfg.env_for(step.name), **os.environ}
            # args may name the step's environment, e.g. "${SMARTLEV_TOPICS_KAFKA__BOOTSTRAP}",
            # so Docker (other addresses) and the native stack share one declaration.
            args = [string.Template(a).substitute(env) for a in step.args]
            cmd = [sys.executable, "-m", step.module, *args]
            if to_console:
                say(f"init {step.name}: {' '.join(cmd[1:])}")
                rc = subprocess.call(cmd, cwd=self.root, env=env, timeout=300)
            else:
                with log.open("w") as out:
                    rc = subprocess.call(
                        cmd,
                        cwd=self.root,
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        timeout=300,
                    )
            if rc != 0:
                raise StackError(
                    f"init step {step.name} ({' '.join(cmd[1:])}) failed with exit {rc}"
                    + ("" if to_console else f"; see {log}:\n{tail(log)}")
                )
            say(f"init {step.name}: done ({step.module})")

    def down(self) -> None:
        self.stop_supervisor()  # again under the lock: one an `up` started meanwhile
        for comp in reversed(self.all()):
            self.stop(comp)

    # ---- the supervisor

    def held_file(self, name: str) -> Path:
        return self.run / f"{name}.held"

    def external_file(self, name: str) -> Path:
        """Marks a component `make up` found served by a process it did not start: the
        supervisor leaves it alone while it is gone (a restart of it, a Redis in Docker)
        rather than starting ours in its place, empty, on its port."""
        return self.run / f"{name}.external"

    def supervisors(self) -> list[int]:
        """This checkout's supervisor processes, found by command line and directory (the
        pid file is for people); more than one only if one was started by hand."""
        found = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit() and int(proc.name) != os.getpid():
                pid = int(proc.name)
                argv, cwd = pid_cmdline(pid), pid_cwd(pid)
                if argv[-1:] != ["supervise"] or len(argv) < 2 or cwd != self.root:
                    continue
                # `make up` names this file by its full path; by hand, relative to root
                if (cwd / argv[-2]).resolve() == Path(__file__).resolve() and pid_alive(pid):
                    found.append(pid)
        return sorted(found)

    def start_supervisor(self) -> None:
        """The supervisor (unless it runs): holds go, everything `up` started is watched.
        One started before this file, stack.toml or Kafka's and Redis's files (their
        ports, by which it knows them; Kafka's jar version) last changed is replaced: it
        read them once, and kept restarting components with the ports, checks and jars
        of before."""
        for held in self.run.glob("*.held"):
            held.unlink()
        read = (Path(__file__), self.config_path, *self.kafka_files(), self.redis_config)
        digest = content_digest(read, self.root)
        record = self.run / "supervisor.sha256"
        if running := self.supervisors():
            recorded = read_record(record)
            if recorded is None:  # started before records were kept: by mtime, once
                began = started_at(running[0])
                current = began is not None and began >= max(p.stat().st_mtime for p in read)
            else:
                current = recorded == digest
            if current:
                record.write_text(f"{digest}\n")
                say(f"supervisor already watching (pid {running[0]})")
                return
            say(
                "stack.py, stack.toml, or Kafka's or Redis's config changed since the "
                "supervisor started; replacing it"
            )
            self.stop_supervisor()
        log = self.log_file("supervisor")
        rotate(log)  # it appends at every start, as a component does
        with log.open("a") as out:
            proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "supervise"],
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        (self.run / "supervisor.pid").write_text(f"{proc.pid}\n")
        record.write_text(f"{digest}\n")  # what it read (computed before it started)
        say(f"supervisor watching (pid {proc.pid}, log {rel(log)})")

    def stop_supervisor(self) -> None:
        """First thing `down` does, so nothing it stops is started again. No handler: a
        SIGTERM ends the supervisor even while it waits for the stack's lock."""
        for pid in self.supervisors():
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                deadline = time.monotonic() + 10.0
                while pid_alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.1)
                if not pid_alive(pid):
                    break
            say(f"stopped supervisor (pid {pid})")
        (self.run / "supervisor.pid").unlink(missing_ok=True)

    def supervise(self, interval_s: float = 1.0, max_backoff_s: float = 60.0) -> None:
        """Until killed: every `interval_s`, under the stack's lock (so never in the middle
        of an `up`, `down`, `stop` or `restart`), start again each component that is not
        running, is not held down and is not served by a process we did not start (nor
        was when `make up` ran: `external_file`). A
        component that did not come back, or died within a minute of coming back, waits
        twice as long before the next try each time (2 s up to `max_backoff_s`)."""
        if running := self.supervisors():
            say(f"a supervisor already watches this stack (pid {running[0]})")
            return
        failures: dict[str, int] = {}  # consecutive tries that failed or died young
        not_before: dict[str, float] = {}
        came_back: dict[str, float] = {}
        gone: set[str] = set()  # external components noted as gone

        def note(msg: str) -> None:
            """Into the supervisor's log, if it can be written: on a full disk the print
            raised, and the supervisor died with it, so nothing that died later came back."""
            with contextlib.suppress(OSError):
                say(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}")

        def back_off(name: str, why: str) -> None:
            failures[name] = failures.get(name, 0) + 1
            delay = min(2.0 ** failures[name], max_backoff_s)
            not_before[name] = time.monotonic() + delay
            note(f"{name} {why}; next try in {delay:.0f} s")

        note(f"supervisor watching {', '.join(c.name for c in self.all())}")
        while True:
            time.sleep(interval_s)
            with contextlib.suppress(ChildProcessError):  # reap what it started and died
                while os.waitpid(-1, os.WNOHANG)[0]:
                    pass
            with locked(self.run):
                for comp in self.all():
                    name = comp.name
                    if self.held_file(name).exists() or time.monotonic() < not_before.get(name, 0):
                        continue
                    if self.external_file(name).exists():
                        if comp.ports and port_holder(comp.ports[0]):
                            gone.discard(name)
                        elif name not in gone:
                            gone.add(name)
                            note(
                                f"{name}: the external one is gone; not starting ours in its "
                                "place (its data is not ours): start it again, or `make up`"
                            )
                        continue
                    if self.running_pid(comp) is not None or (
                        comp.ports and port_holder(comp.ports[0])
                    ):
                        continue
                    last = tail(self.log_file(name), 1).strip()[:160]
                    back_at = came_back.pop(name, None)
                    if back_at is not None and time.monotonic() - back_at < 60.0:
                        back_off(name, f"died soon after coming back ({last})")
                        continue
                    if back_at is not None:
                        failures[name] = 0  # it had been up a while: a fresh failure
                    note(f"{name} is not running (its log's last line: {last}); starting it")
                    try:
                        self.launch(comp)
                        self.wait_healthy(comp)
                        came_back[name] = time.monotonic()
                    except Exception as exc:  # logged; the other components are still watched
                        back_off(name, f"did not come back: {exc}")
                # after the checks: a dead component's log keeps its last line to name
                self.rotate_logs(note)

    def rotate_logs(self, note: Callable[[str], None]) -> None:
        """`rotate_running` for every component's log and the supervisor's; one it cannot
        copy (a full disk) is noted and left as it is, the others still rotated."""
        logs = [self.log_file(c.name) for c in self.all()]
        for log in [*logs, self.log_file("supervisor")]:
            try:
                if rotate_running(log):
                    note(f"{rel(log)} passed {LOG_KEPT_BYTES:,} bytes: copied to .1, emptied")
            except OSError as exc:
                note(f"{rel(log)} not rotated: {exc}")

    def ps(self) -> list[tuple[str, str, str, str]]:
        rows = []
        for comp in self.all():
            pid = self.running_pid(comp)
            ports = ",".join(map(str, comp.ports)) or "-"
            if pid is not None:
                reason = comp.health()
                state = "healthy" if reason is None else f"running, unhealthy: {reason}"
            elif self.held_file(comp.name).exists():
                state = "stopped, held down (`stack.sh stop`; `up` or `restart` starts it)"
            else:
                holders = [h for p in comp.ports if (h := port_holder(p))]
                if holders and comp.external_ok is not None and comp.external_ok():
                    state = f"external (not started by stack.sh): {holders[0]}"
                elif holders:
                    state = f"stopped; port taken by {holders[0]}"
                else:
                    state = "stopped"
            rows.append((comp.name, str(pid or "-"), ports, state))
        supervisors = self.supervisors()
        state = "watching" if supervisors else "stopped (`make up` starts it)"
        rows.append(("supervisor", ",".join(map(str, supervisors)) or "-", "-", state))
        return rows


def module_exists(module: str, root: Path) -> bool:
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def java_bin() -> str:
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").exists():
        return str(Path(home) / "bin" / "java")
    return shutil.which("java") or "java"


# --------------------------------------------------------------------------- system packages


def _apt_install(packages: list[str], log: Path) -> bool:
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return False
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if not getattr(_apt_install, "updated", False):
        run_logged(["apt-get", "update", "-q"], log, "apt-get update", env=env)
        _apt_install.updated = True  # type: ignore[attr-defined]
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    return run_logged(cmd, log, "apt-get install", env=env) == 0


def _stop_distro_redis(log: Path) -> None:
    """Debian's package starts its own redis on 6379; ours must own that port."""
    with log.open("a") as out:
        if Path("/run/systemd/system").exists() and shutil.which("systemctl"):
            subprocess.call(
                ["systemctl", "disable", "--now", "redis-server"], stdout=out, stderr=out
            )
        elif shutil.which("service"):
            subprocess.call(["service", "redis-server", "stop"], stdout=out, stderr=out)


def ensure_apt_packages() -> None:
    """redis-server (required) and kcat (optional tool) from Debian, when missing."""
    run = ROOT / ".run"
    run.mkdir(exist_ok=True)
    log = run / "apt.log"
    if not shutil.which("redis-server"):
        say("installing redis-server (apt-get; first run only)")
        if not _apt_install(["redis-server"], log) or not shutil.which("redis-server"):
            raise StackError(
                "redis-server is not installed and could not be installed (needs root and "
                f"apt-get; see {log}). Install it, and stop the service Debian starts with it: "
                "sudo apt-get install redis-server && sudo systemctl disable --now redis-server"
            )
        _stop_distro_redis(log)
    require_redis_7()
    no_kcat = run / "kcat.unavailable"  # tried once: not again at every `up` and restart
    if not shutil.which("kcat") and not no_kcat.exists():
        say("installing kcat (apt-get; first run only)")
        if not _apt_install(["kcat"], log) or not shutil.which("kcat"):
            no_kcat.write_text("apt-get could not install kcat; delete this file to try again\n")
            warn(f"could not install kcat (optional; see {log}); continuing without it")


def require_redis_7() -> None:
    """redis.conf and the compose file's redis:7 need Redis 7 (Debian 12's); an older
    redis-server (Ubuntu 22.04's 6.0) refuses redis.conf with a "Bad directive"."""
    found = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True, check=False
    ).stdout
    version = found.partition(" v=")[2].split(" ")[0]
    major = version.split(".")[0]
    if not major.isdigit() or int(major) < 7:
        raise StackError(
            f"redis-server {version or found.strip() or '(no version)'} found "
            f"({shutil.which('redis-server')}); the stack needs Redis 7 or newer "
            "(Debian 12: apt-get install redis-server)"
        )


def has_java() -> bool:
    """Whether the Java Kafka runs on (`java_bin`: $JAVA_HOME's first) is there."""
    return shutil.which(java_bin()) is not None


def ensure_java_and_maven() -> None:
    missing = [
        package
        for package, present in (
            ("openjdk-17-jre-headless", has_java()),
            ("maven", shutil.which("mvn") is not None),
        )
        if not present
    ]
    if not missing:
        return
    say(f"installing {' '.join(missing)} (apt-get; needed to fetch and run Kafka)")
    if not _apt_install(missing, ROOT / ".run" / "apt.log") or not shutil.which("mvn"):
        raise StackError(
            "Kafka needs Java 17+ and Maven: sudo apt-get install openjdk-17-jre-headless maven"
        )


# --------------------------------------------------------------------------- CLI


@contextlib.contextmanager
def locked(run: Path) -> Iterator[None]:
    """One `up`/`down`/`restart` at a time per checkout (a second one waits)."""
    run.mkdir(parents=True, exist_ok=True)
    with (run / "stack.lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stack.sh", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("up", help="start Kafka, Redis, init steps and services (idempotent)")
    sub.add_parser("down", help="stop everything `up` started")
    sub.add_parser("ps", help="component, pid, ports, state")
    sub.add_parser("init", help="run the init steps (e.g. topic creation) against the stack")
    logs = sub.add_parser("logs", help="tail .run/*.log")
    logs.add_argument("names", nargs="*")
    logs.add_argument("-n", type=int, default=50)
    logs.add_argument("--no-follow", action="store_true")
    restart = sub.add_parser("restart", help="stop and start one component")
    restart.add_argument("name")
    stop = sub.add_parser("stop", help="stop one component and hold it down until `up`")
    stop.add_argument("name")
    sub.add_parser("restart-kafka")
    sub.add_parser("restart-redis")
    sub.add_parser("supervise", help="start again what exits (`up` starts it)")
    check = sub.add_parser(
        "check", help="one component's health check, once (exit 1 if unhealthy; Docker's too)"
    )
    check.add_argument("name")
    args = parser.parse_args(argv)

    try:
        stack = Stack()
        if args.cmd == "up":
            with locked(stack.run):
                stack.up()
                stack.start_supervisor()
        elif args.cmd == "supervise":
            stack.supervise()
        elif args.cmd == "stop":
            comp = stack.by_name(args.name)
            with locked(stack.run):
                stack.held_file(comp.name).touch()
                stack.stop(comp)
        elif args.cmd == "down":
            stack.stop_supervisor()  # not behind the lock a supervisor's round may hold
            with locked(stack.run):
                stack.down()
        elif args.cmd == "ps":
            rows = [("COMPONENT", "PID", "PORTS", "STATE"), *stack.ps()]
            widths = [max(len(r[i]) for r in rows) for i in range(3)]
            for r in rows:
                print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[3])
        elif args.cmd == "init":
            stack.run_init(to_console=True)
        elif args.cmd == "check":
            reason = stack.by_name(args.name).health()
            print(f"{args.name}: {reason or 'healthy'}")
            return 0 if reason is None else 1
        elif args.cmd == "logs":
            names = args.names or [c.name for c in stack.all()]
            files = [str(stack.log_file(n)) for n in names if stack.log_file(n).exists()]
            files += [str(p) for p in sorted(stack.run.glob("init-*.log")) if not args.names]
            if not files:
                raise StackError(f"no logs under {stack.run} yet (run `make up`)")
            cmd = ["tail", "-n", str(args.n)] + ([] if args.no_follow else ["-F"]) + files
            os.execvp("tail", cmd)
        else:
            name = {"restart-kafka": "kafka", "restart-redis": "redis"}.get(args.cmd)
            comp = stack.by_name(name or args.name)
            if stack.running_pid(comp) is None and comp.ports and port_holder(comp.ports[0]):
                raise StackError(
                    f"{comp.name} on port {comp.ports[0]} was not started by stack.sh "
                    f"({port_holder(comp.ports[0])}); refusing to restart it"
                )
            with locked(stack.run):
                stack.stop(comp)
                stack.held_file(comp.name).unlink(missing_ok=True)
                stack.launch(comp)
                stack.wait_healthy(comp)
    except StackError as exc:
        print(f"stack.sh: error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
