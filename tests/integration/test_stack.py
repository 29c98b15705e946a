"""The native local stack (scripts/stack.sh): real Kafka and Redis answer the pinned clients,
Redis keeps data across a restart (AOF), `up` is idempotent, a taken port is reported at
once, and the runner can start, health-check and stop a declared Python service.

These tests use the stack in this checkout (.run/); they never run `down`."""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from kafka import KafkaAdminClient

from tests.integration.conftest import load_stack_runner

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / ".run"


stack_mod = load_stack_runner()


def stack_sh(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "scripts/stack.sh", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def pid_of(name: str) -> int:
    return int((RUN / f"{name}.pid").read_text().split()[0])


@pytest.fixture(scope="module")
def native_stack() -> None:
    """These tests are about the stack stack.sh runs in this checkout."""
    missing = [n for n in ("kafka", "redis") if not (RUN / f"{n}.pid").exists()]
    if missing:
        pytest.fail(f"{missing} not started by scripts/stack.sh in {ROOT}; run `make up`")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------- Kafka


def test_kafka_python_metadata_request(kafka_bootstrap: str) -> None:
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap, request_timeout_ms=10_000)
    try:
        cluster = admin.describe_cluster()
        topics = admin.list_topics()
    finally:
        admin.close()
    assert cluster["cluster_id"] == "c21hcnRsZXYtbG9jYWwtMQ"  # the fixed id in stack.toml
    assert [(b["broker_id"], b["host"], b["port"]) for b in cluster["brokers"]] == [
        (1, "127.0.0.1", 9092)
    ]
    assert cluster["controller_id"] == 1  # KRaft: the broker is its own controller
    assert isinstance(topics, list)


async def test_aiokafka_metadata_request(kafka_bootstrap: str) -> None:
    """faust's client (aiokafka) speaks to the same broker."""
    from aiokafka import AIOKafkaClient

    client = AIOKafkaClient(bootstrap_servers=kafka_bootstrap, request_timeout_ms=10_000)
    await client.bootstrap()
    try:
        brokers = {(b.nodeId, b.host, b.port) for b in client.cluster.brokers()}
    finally:
        await client.close()
    assert brokers == {(1, "127.0.0.1", 9092)}


# --------------------------------------------------------------------------- Redis


def test_redis_write_and_read(redis_client: redis.Redis) -> None:
    key = f"test:stack:{uuid.uuid4().hex}"
    redis_client.set(key, "v1", ex=60)
    assert redis_client.get(key) == "v1"
    redis_client.delete(key)


def test_redis_runs_with_aof_only(redis_client: redis.Redis) -> None:
    assert redis_client.config_get("appendonly") == {"appendonly": "yes"}
    assert redis_client.config_get("appendfsync") == {"appendfsync": "everysec"}
    assert redis_client.config_get("save") == {"save": ""}  # no RDB: AOF is the one path
    # bounded, and full means writes refused, never positions evicted
    assert int(redis_client.config_get("maxmemory")["maxmemory"]) == 4 * 2**30
    assert redis_client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}


def test_redis_keeps_data_across_restart(native_stack: None, redis_url: str) -> None:
    key = f"test:stack:aof:{uuid.uuid4().hex}"
    before = redis.Redis.from_url(redis_url, decode_responses=True)
    before.hset(key, mapping={"units": "12.5", "equity": "1000.00"})
    before.expire(key, 300)
    before.close()
    old_pid = pid_of("redis")

    result = stack_sh("restart-redis", timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "stopped redis" in result.stdout and "redis is healthy" in result.stdout

    new_pid = pid_of("redis")
    assert new_pid != old_pid and stack_mod.pid_alive(new_pid)
    assert not stack_mod.pid_alive(old_pid)
    after = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        assert after.hgetall(key) == {"units": "12.5", "equity": "1000.00"}
        after.delete(key)
    finally:
        after.close()


def test_another_redis_server_started_from_the_checkout_is_not_ours(native_stack: None) -> None:
    """Ours is known by its config or port too: `make down` must not kill, and `make up`
    must not adopt, a redis-server someone started by hand from the checkout."""
    stack = stack_mod.Stack()
    component = stack.redis()
    other = subprocess.Popen(
        ["redis-server", "--port", str(free_port()), "--save", "", "--appendonly", "no"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while " ".join(stack_mod.pid_cmdline(other.pid)).count(":") == 0:  # its title set
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert stack_mod.pid_cwd(other.pid) == ROOT  # what alone made it "ours" before
        assert not component.owns(other.pid)
        assert other.pid not in stack.strays(component)
        assert component.owns(pid_of("redis"))
    finally:
        other.terminate()
        other.wait(timeout=10)


def test_our_redis_is_ours_while_it_starts_in_its_data_dir(
    native_stack: None, tmp_path: Path
) -> None:
    """Between reading `dir` (it is then in the data dir) and rewriting its title, our
    Redis has its data dir as cwd and our config, not our port, in its command line, and
    was not recognized as ours (a fresh clone's CI stopped at "redis exited during
    start-up"). A process named redis-server in that state stands in for it."""
    stack = stack_mod.Stack()
    component = stack.redis()
    fake = tmp_path / "redis-server"
    fake.symlink_to("/bin/sh")  # the kernel names a process after the file it executes
    data_dir = (ROOT / stack.redis_conf["dir"]).resolve()
    starting = subprocess.Popen(
        [str(fake), "-c", "sleep 30; exit", str(stack.redis_config)],  # "; exit": sh stays sh
        cwd=data_dir,
    )
    try:
        deadline = time.monotonic() + 10
        # Popen returns before the child's exec is done, and the kernel renames the process
        # before it lays out the new command line (read in between, it is empty: CI failed so)
        pid, argv0 = starting.pid, [str(fake)]
        while stack_mod.pid_comm(pid) != "redis-server" or stack_mod.pid_cmdline(pid)[:1] != argv0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert stack_mod.pid_cwd(pid) == data_dir
        assert component.owns(pid)
    finally:
        starting.kill()
        starting.wait(timeout=10)


@pytest.mark.parametrize(
    "settings",
    [
        ["--appendonly", "no"],  # Debian's own service: positions lost at its next restart
        ["--appendonly", "yes", "--maxmemory-policy", "allkeys-lru"],  # evicts them when full
    ],
    ids=["no-aof", "evicting"],
)
def test_a_redis_that_may_lose_keys_is_not_taken_for_an_external_one(
    native_stack: None, tmp_path: Path, settings: list[str]
) -> None:
    """A Redis someone else runs is reused only if it keeps every write: logged (AOF) and
    never evicted to make room."""
    port = free_port()
    other = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--dir", str(tmp_path), *settings],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while stack_mod.redis_ping(port) is not None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert not stack_mod.redis_durable(port)
        assert stack_mod.redis_durable(6379)  # ours: appendonly yes, noeviction
    finally:
        other.terminate()
        other.wait(timeout=10)


def test_a_component_loading_its_data_is_waited_for_past_its_start_timeout(
    native_stack: None,
) -> None:
    """A Redis reading back a large AOF answers LOADING for longer than its start timeout
    (a 4 GB dataset takes ~18 s, the timeout is 15): it was stopped mid-load, and the
    supervisor, relaunching it on the same timeout, never got it back. A live process
    that says it is loading is waited for; one that only fails its check is not."""
    stack = stack_mod.Stack()
    loading_until = time.monotonic() + 1.5
    sleeper = subprocess.Popen(["sleep", "30"])

    def health() -> str | None:
        return f"{stack_mod.LOADING} (stand-in)" if time.monotonic() < loading_until else None

    component = stack_mod.Component(
        name="loading-stand-in",
        ports=(),
        argv=lambda: ["sleep", "30"],
        health=health,
        owns=lambda pid: pid == sleeper.pid,
        start_timeout_s=0.3,
    )
    try:
        stack.launched[component.name] = (sleeper, time.monotonic())
        stack.wait_healthy(component, quiet=True)  # returned: healthy, not stopped
        assert time.monotonic() >= loading_until and sleeper.poll() is None
        # loading for ever: waited for LOADING_TIMES start timeouts, no longer
        endless = stack_mod.Component(
            **{**vars(component), "health": lambda: f"{stack_mod.LOADING} (stand-in)"}
        )
        stack.launched[component.name] = (sleeper, began := time.monotonic())
        with pytest.raises(stack_mod.StackError, match="did not come up within"):
            stack.wait_healthy(endless, quiet=True)
        assert time.monotonic() - began >= stack_mod.LOADING_TIMES * 0.3
        sleeper = subprocess.Popen(["sleep", "30"])  # stopped with it: a fresh one
        failing = stack_mod.Component(**{**vars(component), "health": lambda: "PING: '-ERR'"})
        stack.launched[component.name] = (sleeper, time.monotonic())
        with pytest.raises(stack_mod.StackError, match="did not come up within"):
            stack.wait_healthy(failing, quiet=True)
    finally:
        sleeper.kill()
        sleeper.wait(timeout=10)


def test_a_failed_fetch_of_new_kafka_jars_leaves_the_working_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pom changed (a dependency bumped) and Maven Central cannot be reached: the
    jars Kafka runs on were deleted before the download, which then failed, so Kafka
    could not start again until the network came back. It starts on them now, and the
    next fetch tries again; with no jars at all the fetch's failure stops the start."""
    stack = stack_mod.Stack()
    stack.run = tmp_path
    stack.kafka_libs = tmp_path / "kafka" / "libs"
    stack.kafka_libs.mkdir(parents=True)
    working = stack.kafka_libs / f"kafka_2.13-{stack.kafka_version}.jar"
    working.write_bytes(b"the jar Kafka runs on")
    (stack.kafka_libs.parent / ".complete").write_text("the hash of the pom before\n")
    monkeypatch.setattr(stack_mod, "ensure_java_and_maven", lambda: None)
    monkeypatch.setattr(stack_mod, "run_logged", lambda *args, **kwargs: 1)  # unreachable
    stack.fetch_kafka()  # no error: Kafka starts on the jars of before
    assert working.read_bytes() == b"the jar Kafka runs on"
    stamp = (stack.kafka_libs.parent / ".complete").read_text()
    assert stamp == "the hash of the pom before\n"  # not marked fetched: tried again
    working.unlink()
    with pytest.raises(stack_mod.StackError, match="fetching Kafka jars with Maven failed"):
        stack.fetch_kafka()


def test_native_redis_major_matches_compose_image(redis_client: redis.Redis) -> None:
    import yaml

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    image_major = compose["services"]["redis"]["image"].split(":")[1].split(".")[0]
    assert str(redis_client.info("server")["redis_version"]).split(".")[0] == image_major


# --------------------------------------------------------------------------- stack.sh


def test_up_again_is_a_noop(native_stack: None) -> None:
    pids = {n: pid_of(n) for n in ("kafka", "redis")}
    started = time.monotonic()
    result = stack_sh("up")
    assert result.returncode == 0, result.stdout + result.stderr
    assert time.monotonic() - started < 20
    assert "kafka already running" in result.stdout
    assert "redis already running" in result.stdout
    assert "started kafka" not in result.stdout and "started redis" not in result.stdout
    assert {n: pid_of(n) for n in pids} == pids


def test_check_runs_one_components_health_check(native_stack: None, tmp_path: Path) -> None:
    """What compose's healthchecks run in each container: exit 0 only when healthy."""
    for name in ("redis", "venue", "regime"):
        result = stack_sh("check", name, timeout=60)
        assert (result.returncode, result.stdout) == (0, f"{name}: healthy\n")
    assert stack_sh("check", "nosuch").returncode == 1
    config = tmp_path / "stack.toml"  # a service whose port nothing listens on
    port = free_port()
    config.write_text(
        stack_mod.CONFIG.read_text()
        + f'\n[[services]]\nname = "example"\nmodule = "services.example"\nports = [{port}]\n'
        f'health = {{ kind = "http", port = {port}, path = "/healthz" }}\n'
    )
    reason = stack_mod.Stack(config=config).by_name("example").health()
    assert reason is not None and "refused" in reason


def test_ps_shows_component_pid_ports_state(native_stack: None) -> None:
    result = stack_sh("ps", timeout=60)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert re.match(rf"kafka\s+{pid_of('kafka')}\s+9092,9093\s+healthy$", rows["kafka"])
    assert re.match(rf"redis\s+{pid_of('redis')}\s+6379\s+healthy$", rows["redis"])


def service_row(name: str) -> str:
    rows = stack_sh("ps", timeout=60).stdout.splitlines()[1:]
    return next(row for row in rows if row.split()[0] == name)


def test_the_supervisor_starts_again_a_service_that_died(native_stack: None) -> None:
    """As docker-compose's `restart: unless-stopped`: a kill -9 of a service is undone."""
    assert re.match(r"supervisor\s+\d+\s+-\s+watching$", service_row("supervisor"))
    killed = pid_of("nav")
    os.killpg(killed, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        row = service_row("nav")
        if row.endswith("healthy") and not row.endswith("unhealthy") and row.split()[1] != "-":
            break
        time.sleep(0.5)
    assert int(row.split()[1]) != killed, row
    assert re.match(r"nav\s+\d+\s+9105\s+healthy$", row), row
    log = (ROOT / ".run" / "supervisor.log").read_text()
    assert "nav is not running" in log


def test_up_replaces_a_supervisor_older_than_the_stack_runner(native_stack: None) -> None:
    """A supervisor reads stack.py and stack.toml once: after either changed (a pull, an
    edit of a port), `up` starts a new one instead of leaving the old one watching."""
    before = pid_of("supervisor")
    result = stack_sh("up")
    assert result.returncode == 0, result.stdout + result.stderr
    assert pid_of("supervisor") == before  # unchanged: kept
    os.utime(ROOT / "scripts" / "stack.py")  # a newer mtime is not a change
    result = stack_sh("up")
    assert result.returncode == 0, result.stdout + result.stderr
    assert pid_of("supervisor") == before
    record = RUN / "supervisor.sha256"
    record.write_text("0" * 64 + "\n")  # it read other content than the files hold now
    result = stack_sh("up")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "replacing it" in result.stdout
    after = pid_of("supervisor")
    assert after != before and not stack_mod.pid_alive(before)
    assert re.match(rf"supervisor\s+{after}\s+-\s+watching$", service_row("supervisor"))


def test_stop_holds_a_service_down_until_it_is_restarted(native_stack: None) -> None:
    assert stack_sh("stop", "nav").returncode == 0
    try:
        time.sleep(3)  # three of the supervisor's rounds
        assert re.match(r"nav\s+-\s+9105\s+stopped, held down", service_row("nav"))
    finally:
        result = stack_sh("restart", "nav")
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.match(r"nav\s+\d+\s+9105\s+healthy$", service_row("nav"))


def listening() -> dict[int, set[str]]:
    """TCP port -> the addresses something listens on (IPv4 and IPv6), from /proc."""
    out: dict[int, set[str]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as rows:
            for row in list(rows)[1:]:
                local, state = row.split()[1], row.split()[3]
                if state == "0A":  # LISTEN
                    address, port = local.rsplit(":", 1)
                    out.setdefault(int(port, 16), set()).add(address)
    return out


# 127.0.0.1, ::1, ::ffff:127.0.0.1 (Java's and gRPC's IPv4 on an IPv6 socket)
LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}


def test_every_port_of_the_stack_listens_on_loopback_only(native_stack: None) -> None:
    """Kafka, Redis, both gRPC servers and every service's /metrics + /healthz (these
    listened on 0.0.0.0)."""
    ports = {p for s in stack_mod.load_config(stack_mod.CONFIG).services for p in s.ports}
    ports |= {9092, 9093, 6379}
    bound = listening()
    assert ports <= set(bound), f"not listening: {sorted(ports - set(bound))}"
    wide = {port: sorted(bound[port]) for port in ports if not bound[port] <= LOOPBACK}
    assert not wide, f"listening beyond loopback: {wide}"


def test_taken_port_is_reported_at_once_with_its_holder() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(stack_mod.StackError) as err:
            stack_mod.check_port_free(port, "kafka")
        assert time.monotonic() - started < 2
    message = str(err.value)
    assert f"port {port} (needed by kafka) is in use by pid {os.getpid()}" in message
    assert "python" in message.split(f"pid {os.getpid()}")[1]  # names the holder's command
    stack_mod.check_port_free(port, "kafka")  # released: no error


def test_an_unhealthy_service_is_reported_with_its_failing_checks() -> None:
    """`up` and `ps` say which check failed and why, not only "HTTP Error 503"."""
    body = json.dumps(
        {
            "service": "hedging",
            "status": "unhealthy",
            "checks": {
                "kafka": {"ok": True, "detail": "ok", "ms": 1.0},
                "consumer": {"ok": False, "detail": "3 new input message(s) waiting", "ms": 2.0},
            },
        }
    ).encode()

    class Unhealthy(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(503)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Unhealthy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        reason = stack_mod.http_health(server.server_address[1], "/healthz")
    finally:
        server.shutdown()
    assert reason == "HTTP 503, consumer: 3 new input message(s) waiting"


def test_unknown_command_and_no_args_fail() -> None:
    assert stack_sh("frobnicate").returncode != 0
    assert stack_sh().returncode != 0


def test_a_log_is_tailed_from_its_end_and_moved_aside_once_long(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker's log reached 1.6 GB in a day of test runs: a failure message's tail
    read all of it (6 s, 3.5 GB of memory), and every launch appended to it."""
    log = tmp_path / "kafka.log"
    log.write_text("".join(f"line {n}\n" for n in range(2_000_000)))  # ~16 MB
    tracemalloc.start()
    try:
        last = stack_mod.tail(log, 2)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert last == "    line 1999998\n    line 1999999"
    assert peak < 1_000_000
    assert stack_mod.tail(tmp_path / "none.log") == "(no log)"

    monkeypatch.setattr(stack_mod, "LOG_KEPT_BYTES", log.stat().st_size)
    stack_mod.rotate(log)  # not past the limit: kept where it is
    assert log.exists() and not (tmp_path / "kafka.log.1").exists()
    with log.open("a") as more:
        more.write("one more\n")
    stack_mod.rotate(log)
    assert not log.exists()
    assert stack_mod.tail(tmp_path / "kafka.log.1", 1) == "    one more"
    stack_mod.rotate(tmp_path / "none.log")  # no log yet: nothing to do


def test_a_running_components_log_is_copied_aside_and_emptied_once_long(tmp_path: Path) -> None:
    """The supervisor's round rotates the log of a component that runs for months: the
    component writes on into the emptied file (it appends, as `launch` opens it)."""
    log = tmp_path / "venue.log"
    assert not stack_mod.rotate_running(log, limit=1000)  # no log yet
    writer = (
        "import itertools, time\n"
        "for i in itertools.count(): print(f'line {i}', flush=True); time.sleep(0.0005)"
    )
    with log.open("a") as out:
        proc = subprocess.Popen([sys.executable, "-c", writer], stdout=out)
    try:
        assert not stack_mod.rotate_running(log, limit=10**9)  # short: left alone
        deadline = time.monotonic() + 10
        while log.stat().st_size <= 20_000:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert stack_mod.rotate_running(log, limit=20_000)
        deadline = time.monotonic() + 10
        while log.stat().st_size < 1_000:  # it writes on into the emptied file
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    aside = (tmp_path / "venue.log.1").read_text().splitlines()
    after = log.read_text().splitlines()
    assert aside[0] == "line 0" and len(aside) > 2_000
    assert 0 < len(after) < len(aside) and after[0].startswith("line ")  # no gap of NULs
    assert int(after[0].split()[1]) > int(aside[-1].split()[1])


def test_the_supervisors_round_rotates_every_log_it_can(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A log it cannot copy aside (a full disk, here a directory in the way) is noted
    and left whole, and the others are still rotated: the error ended the supervisor."""
    stack = stack_with_service(tmp_path, free_port())
    stack.run.mkdir(parents=True)
    monkeypatch.setattr(stack_mod, "LOG_KEPT_BYTES", 1000)
    kafka, websvc = stack.log_file("kafka"), stack.log_file("websvc")
    for log in (kafka, websvc):
        log.write_text("x" * 2000 + "\n")
    (stack.run / "kafka.log.1").mkdir()
    notes: list[str] = []
    stack.rotate_logs(notes.append)
    assert websvc.stat().st_size == 0 and (stack.run / "websvc.log.1").stat().st_size == 2001
    assert kafka.stat().st_size == 2001
    [refused] = [n for n in notes if "not rotated" in n]
    assert "kafka.log not rotated" in refused


def test_the_supervisor_lives_on_when_its_log_cannot_be_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a full disk the supervisor's own notes raised (ENOSPC) outside any `try`, and it
    died: nothing that died afterwards came back, even once space was freed. Its notes
    are dropped then, and its rounds go on trying (each try here fails, and is tried
    again; the fifth ends the test's supervisor)."""
    stack = stack_with_service(tmp_path, free_port())
    stack.run.mkdir(parents=True)
    tries: list[str] = []

    def full_disk(msg: str) -> None:
        raise OSError(28, "No space left on device")

    def launch(comp: Any) -> None:
        tries.append(comp.name)
        if len(tries) >= 5:
            raise SystemExit  # not an Exception: ends the round's loop, and the test's run
        raise RuntimeError("cannot start")

    monkeypatch.setattr(stack_mod, "say", full_disk)
    monkeypatch.setattr(stack, "supervisors", list)  # (the running stack's is not this one)
    monkeypatch.setattr(stack, "launch", launch)
    monkeypatch.setattr(stack, "all", lambda: [c for c in stack.services() if c.name == "websvc"])
    with pytest.raises(SystemExit):
        stack.supervise(interval_s=0.01, max_backoff_s=0.02)
    assert tries == ["websvc"] * 5


def test_the_supervisor_leaves_a_component_make_up_found_external_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An external Redis `make up` reused, restarted, found ours started in its place on
    its port (with none of its data: the positions gone) and could not bind again. The
    supervisor now notes it gone, once, and starts nothing; without the mark it does."""
    stack = stack_with_service(tmp_path, free_port())
    stack.run.mkdir(parents=True)
    stack.external_file("websvc").write_text("someone else's\n")
    launched: list[str] = []
    notes: list[str] = []
    rounds: list[float] = []

    def sleep(seconds: float) -> None:
        rounds.append(seconds)
        if len(rounds) % 5 == 0:
            raise SystemExit  # ends the test's supervisor

    monkeypatch.setattr(stack_mod, "say", notes.append)
    monkeypatch.setattr(stack, "supervisors", list)  # (the running stack's is not this one)
    monkeypatch.setattr(stack, "launch", lambda comp: launched.append(comp.name))
    monkeypatch.setattr(stack, "wait_healthy", lambda comp: None)
    monkeypatch.setattr(stack, "all", lambda: [c for c in stack.services() if c.name == "websvc"])
    monkeypatch.setattr(stack_mod.time, "sleep", sleep)
    with pytest.raises(SystemExit):
        stack.supervise(interval_s=0.01, max_backoff_s=0.02)
    assert launched == [] and len([n for n in notes if "external one is gone" in n]) == 1
    stack.external_file("websvc").unlink()  # ours: started again as before
    with pytest.raises(SystemExit):
        stack.supervise(interval_s=0.01, max_backoff_s=0.02)
    assert launched == ["websvc"]


# --------------------------------------------------------------------------- Python services


def stack_with_service(tmp_path: Path, port: int) -> object:
    """A Stack on a private run dir, declaring one service: Python's own http.server."""
    config = tmp_path / "stack.toml"
    config.write_text(
        (ROOT / "scripts" / "stack.toml").read_text()
        + f"""
[[services]]
name = "websvc"
module = "http.server"
args = ["{port}", "--bind", "127.0.0.1"]
ports = [{port}]
env = {{ SMARTLEV_WEBSVC_EXTRA = "1" }}
health = {{ kind = "http", port = {port}, path = "/" }}
start_timeout_s = 15
"""
    )
    return stack_mod.Stack(root=ROOT, config=config, run_dir=tmp_path / "run")


def test_declared_service_starts_is_healthy_and_stops(tmp_path: Path) -> None:
    port = free_port()
    stack = stack_with_service(tmp_path, port)
    svc = next(s for s in stack.services() if s.name == "websvc")
    assert svc.env["SMARTLEV_WEBSVC_KAFKA__BOOTSTRAP"] == "127.0.0.1:9092"  # from [env]
    assert svc.env["SMARTLEV_WEBSVC_EXTRA"] == "1"
    stack.run.mkdir(parents=True)
    pid = stack.launch(svc)
    try:
        assert pid is not None
        stack.wait_healthy(svc)
        assert stack.launch(svc) is None  # second start: already running, same pid
        assert stack.running_pid(svc) == pid
        row = next(r for r in stack.ps() if r[0] == "websvc")
        assert row == ("websvc", str(pid), str(port), "healthy")
        env = (Path(f"/proc/{pid}/environ").read_bytes()).split(b"\0")
        assert b"SMARTLEV_WEBSVC_REDIS__URL=redis://127.0.0.1:6379/0" in env
    finally:
        stack.stop(svc)
    assert not stack_mod.pid_alive(pid)
    assert not (stack.run / "websvc.pid").exists()
    assert next(r for r in stack.ps() if r[0] == "websvc") == ("websvc", "-", str(port), "stopped")


def test_a_launched_process_is_waited_for_before_it_looks_like_ours(tmp_path: Path) -> None:
    """Right after its launch a component's process may not be recognizable yet (Popen
    returns before the kernel renames the child at exec; Redis rewrites its title only
    once set up): `up` watches what it launched by the process itself, so a start-up in
    that window is not taken for an exit. Here `owns` never recognizes it."""
    port = free_port()
    stack = stack_with_service(tmp_path, port)
    svc = next(s for s in stack.services() if s.name == "websvc")
    unrecognized = stack_mod.Component(**{**vars(svc), "owns": lambda pid: False})
    stack.run.mkdir(parents=True)
    pid = stack.launch(unrecognized)
    try:
        assert pid is not None
        stack.wait_healthy(unrecognized)
        assert stack_mod.http_health(port, "/") is None
    finally:
        os.kill(pid, signal.SIGKILL)
    stack.launched[svc.name][0].wait(timeout=10)
    with pytest.raises(stack_mod.StackError, match="exited during start-up"):
        stack.wait_healthy(unrecognized)
    # and one that never turns healthy is stopped at its timeout, recognized or not
    never = stack_mod.Component(
        **{**vars(unrecognized), "health": lambda: "never", "start_timeout_s": 0.5}
    )
    pid = stack.launch(never)
    assert pid is not None
    with pytest.raises(stack_mod.StackError, match="did not come up"):
        stack.wait_healthy(never)
    assert not stack_mod.pid_alive(pid)


def test_a_service_whose_code_changed_is_stopped_for_up_to_start_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """After a `git pull` (or an edit, new pinned packages) `up` said "already running"
    and the old code served on; a supervisor restart of one service then put new code
    beside old peers. Changed means other content than the launch recorded: a file
    stamped in the future restarted services on every `up`, and new code with old
    mtimes (rsync -t, an unpacked archive) went unseen. Each `up` is a fresh runner."""
    supervisor = stack_with_service(tmp_path, free_port())  # loads the declarations once

    def up_again() -> Any:  # what a later `make up` is: a runner on the files as they are
        return stack_mod.Stack(root=ROOT, config=supervisor.config_path, run_dir=supervisor.run)

    def websvc(runner: Any) -> Any:
        return next(s for s in runner.services() if s.name == "websvc")

    def stale_stopped() -> bool:
        runner = up_again()
        runner.stop_stale([websvc(runner)])
        return runner.running_pid(websvc(runner)) is None

    svc = websvc(supervisor)
    supervisor.run.mkdir(parents=True)
    pid = supervisor.launch(svc)
    try:
        supervisor.wait_healthy(svc)
        assert supervisor.code_record(svc).read_text().strip() == supervisor.code_digest()
        assert not stale_stopped()  # the code is as it was: left alone
        future = time.time() + 3600
        os.utime(supervisor.config_path, (future, future))  # same content, a future mtime
        assert not stale_stopped()
        # The declarations change (with an old mtime) while it runs; it dies and the
        # supervisor, which loaded them before, starts it again on those: still stale.
        with supervisor.config_path.open("a") as declarations:
            declarations.write("# changed\n")
        os.utime(supervisor.config_path, (0, 0))
        os.kill(pid, signal.SIGKILL)
        supervisor.launched[svc.name][0].wait(timeout=10)
        pid = supervisor.launch(svc)
        supervisor.wait_healthy(svc)
        assert stale_stopped() and not stack_mod.pid_alive(pid)
        assert "websvc: its code changed since it started" in capsys.readouterr().out
        fresh = up_again()  # what `up` does next: starts it on the files as they are
        pid = fresh.launch(websvc(fresh))
        fresh.wait_healthy(websvc(fresh))
        assert not stale_stopped()
        fresh.code_record(svc).unlink()  # started before records were kept:
        os.utime(supervisor.config_path, (future, future))  # by mtime, once
        assert stale_stopped() and not stack_mod.pid_alive(pid)
        pid = fresh.launch(websvc(fresh))
        fresh.wait_healthy(websvc(fresh))
        assert not stale_stopped()
    finally:
        up_again().stop(svc, quiet=True)


def test_a_component_older_than_its_config_file_is_stopped_for_up_to_start_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Kafka and Redis read their config once: a changed setting (session 22 moved
    offsets.retention.minutes) waited for a restart `up` never gave. Shown on a declared
    service with a file of its own, not on the stack's broker."""
    port = free_port()
    stack = stack_with_service(tmp_path, port)
    svc = next(s for s in stack.services() if s.name == "websvc")
    config, pom = tmp_path / "websvc.properties", tmp_path / "pom.xml"
    config.write_text("setting=1\n")
    pom.write_text("<version>3.9.1</version>\n")
    files = [config, pom]
    stack.run.mkdir(parents=True)
    pid = stack.launch(svc)
    try:
        stack.wait_healthy(svc)
        stack.stop_reconfigured([(svc, files)])  # written before it started: left alone
        os.utime(config, (time.time() + 3600,) * 2)  # same content, a future mtime
        stack.stop_reconfigured([(svc, files)])
        assert stack.running_pid(svc) == pid
        config.write_text("setting=2\n")
        stack.stop_reconfigured([(svc, files)])
        assert not stack_mod.pid_alive(pid) and stack.running_pid(svc) is None
        assert "websvc: its config changed since it started" in capsys.readouterr().out
        pid = stack.launch(svc)  # what `up` does next: on the config as it is now
        stack.wait_healthy(svc)
        stack.stop_reconfigured([(svc, files)])
        assert stack.running_pid(svc) == pid  # once
        # its program found elsewhere (`java` before and after the first `up` installs
        # it, or through JAVA_HOME) is the same command line: no restart for it
        elsewhere = dataclasses.replace(svc, argv=lambda: ["/elsewhere/bin/x", *svc.argv()[1:]])
        stack.stop_reconfigured([(elsewhere, files)])
        assert stack.running_pid(svc) == pid
        # Kafka's other files (its pom: a version bumped, a jar for a CVE) count too:
        # the broker ran on the old jars while compose moved to the new version
        pom.write_text("<version>3.9.2</version>\n")
        stack.stop_reconfigured([(svc, files)])
        assert not stack_mod.pid_alive(pid) and stack.running_pid(svc) is None
        pid = stack.launch(svc)
        stack.wait_healthy(svc)
        stack.stop_reconfigured([(svc, files)])
        # and so does its command line (Kafka's heap; its jars' version, in its classpath)
        declared = tmp_path / "stack.toml"
        declared.write_text(
            declared.read_text().replace('"--bind"', '"--protocol", "HTTP/1.1", "--bind"')
        )
        moved = stack_mod.Stack(root=ROOT, config=declared, run_dir=stack.run)
        [moved_svc] = [s for s in moved.services() if s.name == "websvc"]
        assert moved_svc.argv() != svc.argv()
        moved.stop_reconfigured([(moved_svc, files)])
        assert not stack_mod.pid_alive(pid) and stack.running_pid(svc) is None
    finally:
        stack.stop(svc, quiet=True)


def test_service_whose_port_is_taken_fails_fast(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        stack = stack_with_service(tmp_path, port)
        svc = next(s for s in stack.services() if s.name == "websvc")
        stack.run.mkdir(parents=True)
        started = time.monotonic()
        with pytest.raises(stack_mod.StackError, match=rf"port {port} .*in use by pid"):
            stack.launch(svc)
        assert time.monotonic() - started < 2
    assert not (stack.run / "websvc.pid").exists()
