"""The README's gateway session ("Using the gateway"), run as written, command after
command in one shell, against a fresh pipeline and gateway.

The commands are the README's text. Two things route them to the test's own stack: the
environment (the replay's namespace, `SMARTLEV_GATEWAY` for the CLI) and, in the grpcurl
commands alone, the gateway's address. Prices move while the session runs, so outputs
are compared by their shape: every JSON reply has the README's fields, with the same ids,
products and settings; every table has the README's title, columns and rows, its numbers
and codes aside; every refusal is the README's line, to the letter.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

import grpc
import pytest
from smartlev.v1 import gateway_pb2, gateway_pb2_grpc

from shared.core.events import Reason
from shared.core.regime import Regime
from shared.pipeline_runner import GATEWAY, ROOT, STAGES, Pipeline

pytestmark = pytest.mark.integration

README = ROOT / "README.md"
ADDRESS = "127.0.0.1:50051"  # where the README's grpcurl commands call the gateway
# the JSON fields whose values do not move with prices
FIXED_FIELDS = {
    "order_id",
    "position_id",
    "product",
    "symbol",
    "side",
    "amount",
    "open",
    "status",
    "tradable",
    "min_order",
    "max_order",
    "amount_decimals",
    "units_decimals",
    "open_fee_rate",
    "close_fee_rate",
}
MARK = "@@readme-step-exit"
# what a table's regime and why columns show: they move with prices too
_CODES = {*Regime, *(v for k, v in vars(Reason).items() if k.isupper())}
CODES = re.compile(r"\b(" + "|".join(sorted(_CODES, key=len, reverse=True)) + r")\b")


class Step(NamedTuple):
    command: str  # as written, continuation lines included
    expected: str


def readme_steps(text: str) -> tuple[str, list[Step]]:
    """The command that feeds prices, and the session's steps (grpcurl, then the CLI)."""
    start, end = text.index("\n### grpcurl\n"), text.index("\n### Tests and benchmark\n")
    usage = text.index("\n## Using the gateway\n")
    [feed] = [c for c in _blocks(text[usage:start]) if "services.ingestion replay" in c]
    steps = []
    for block in _blocks(text[start:end]):
        lines = block.splitlines()
        i = 0
        while i < len(lines):
            assert lines[i].startswith("$ "), f"README: no command at {lines[i]!r}"
            command = [lines[i][2:]]
            while command[-1].endswith("\\"):
                i += 1
                command.append(lines[i])
            i += 1
            output = []
            while i < len(lines) and not lines[i].startswith("$ "):
                output.append(lines[i])
                i += 1
            steps.append(Step("\n".join(command), "\n".join(output)))
    return feed.removeprefix("$ "), steps


def _blocks(text: str) -> list[str]:
    return re.findall(r"^```\n(.*?)^```$", text, re.S | re.M)


def _table(text: str) -> list[str]:
    """A rich table or panel without what moves: numbers, regime and reason codes, the
    id a close made up, and the width they took."""
    text = re.sub(r"cli-[0-9a-f]{20}", "cli-<made up>", text)
    text = CODES.sub("<code>", text)
    text = re.sub(r"[-+]?\d[\d,]*(\.\d+)?", "#", text)
    return [" ".join(re.sub(r"[─━]+", " ", line).split()) for line in text.splitlines()]


def _json_shape(expected: Any, actual: Any, path: str = "") -> list[str]:
    """Where `actual` differs from `expected` in its fields, or in a fixed field's value."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        problems = []
        if expected.keys() != actual.keys():
            problems.append(f"{path or '.'}: fields {sorted(actual)}, README {sorted(expected)}")
        for name in expected.keys() & actual.keys():
            where = f"{path}.{name}"
            if name in FIXED_FIELDS and expected[name] != actual[name]:
                problems.append(f"{where}: {actual[name]!r}, README {expected[name]!r}")
            else:
                problems += _json_shape(expected[name], actual[name], where)
        return problems
    if type(expected) is not type(actual):
        return [f"{path}: {actual!r}, README {expected!r}"]
    if isinstance(expected, list) and expected and actual:
        return _json_shape(expected[0], actual[0], f"{path}[0]")
    return []


def differences(step: Step, output: str) -> list[str]:
    """How `output` differs from what the README shows for `step`."""
    expected = step.expected
    if expected.startswith("{"):
        return _json_shape(json.loads(expected), json.loads(output))
    if re.search(r"[│┃┌┏]", expected):  # a table or a receipt: numbers move
        return [] if _table(output) == _table(expected) else [f"output:\n{output}"]
    # refusals, exit codes (`echo $?`), listings: to the letter
    return [] if output == expected else [f"output:\n{output}"]


def run_session(steps: list[Step], env: dict[str, str], port: int) -> list[tuple[str, int]]:
    """Each step's output and exit status, all run by one shell (so `export` and `$?`
    mean what they mean in a terminal)."""
    script = []
    for step in steps:
        command = step.command
        if "grpcurl" in command:
            command = command.replace(ADDRESS, f"127.0.0.1:{port}")
        script += [
            f"{command} 2>&1",
            f"status=$?; printf '\\n{MARK} %d\\n' $status; (exit $status)",
        ]
    done = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    parts = re.split(rf"\n{MARK} (\d+)\n", done.stdout)
    results = [(parts[i].strip("\n"), int(parts[i + 1])) for i in range(0, len(parts) - 1, 2)]
    assert len(results) == len(steps), f"the session stopped early:\n{done.stdout}{done.stderr}"
    return results


@pytest.fixture
def gateway_stack(kafka_bootstrap: str, redis_url: str) -> Iterator[Pipeline]:
    with Pipeline.start(
        services=(*STAGES, GATEWAY), bootstrap=kafka_bootstrap, redis_url=redis_url
    ) as pipeline:
        yield pipeline


def _priced(port: int) -> None:
    """Wait until the replayed prices marked BTC's NAV (a person waits as long)."""
    deadline = time.monotonic() + 120
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        request = gateway_pb2.GetProductRequest(product="BTC-USDT:LONG")
        while time.monotonic() < deadline:
            product = stub.GetProduct(
                request, metadata=(("authorization", "Bearer dev-alice-key"),), timeout=10
            )
            if product.price:
                return
            time.sleep(0.5)
    raise AssertionError("the README's replay marked no NAV within 2 minutes")


def test_the_readme_gateway_session_runs_as_written(gateway_stack: Pipeline) -> None:
    feed, steps = readme_steps(README.read_text())
    assert len(steps) >= 15 and feed.rstrip().endswith("&")
    port = gateway_stack.ports["gateway.grpc"]
    env = {
        **gateway_stack.env_for("ingestion"),
        "SMARTLEV_GATEWAY": f"127.0.0.1:{port}",
        # The README's session ran at 120 columns, where its positions table just fits:
        # a PnL two digits longer turns it into one record per row, as documented. Wider,
        # a table is as wide as it needs (the README's layout), whatever the prices.
        "COLUMNS": "160",
    }
    env.pop("SMARTLEV_API_KEY", None)
    # grpcurl is built on first use (Go): before the session, so that is not in its output
    installed = subprocess.run(
        ["bash", "scripts/grpcurl.sh", "-version"], cwd=ROOT, capture_output=True, text=True
    )
    assert installed.returncode == 0, installed.stderr
    replay = subprocess.Popen(
        ["bash", "-c", f"exec {feed.rstrip().removesuffix('&')}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _priced(port)
        results = run_session(steps, env, port)
    finally:
        os.killpg(replay.pid, signal.SIGTERM)
        replay.wait(timeout=30)
    problems = []
    for step, (output, status) in zip(steps, results, strict=True):
        refused = step.expected.lower().startswith("error:")
        if status != 0 and not refused:
            problems.append(f"$ {step.command}\nexited {status}:\n{output}")
            continue
        problems += [f"$ {step.command}\n{why}" for why in differences(step, output)]
    assert not problems, "\n\n".join(problems)


def test_the_shape_comparison_sees_a_changed_field_column_or_message() -> None:
    """The comparison above ignores prices; it must not ignore anything else."""
    readme = README.read_text()
    _, steps = readme_steps(readme)
    by_kind = {
        "json": next(s for s in steps if s.expected.startswith('{\n  "order_id"')),
        "table": next(s for s in steps if "positions" in s.command and "│" in s.expected),
        "error": next(s for s in steps if s.expected.startswith("error:")),
        "status": next(s for s in steps if s.command == "echo $?"),
    }
    for step in by_kind.values():
        assert differences(step, step.expected) == []
    opened = json.loads(by_kind["json"].expected)
    moved = {**opened, "nav": "123.45678901", "fee": "9"}  # prices move: not a difference
    assert differences(by_kind["json"], json.dumps(moved)) == []
    for changed in (
        {**opened, "position_id": "0" * 32},
        {k: v for k, v in opened.items() if k != "fee"},
        {**opened, "position": {**opened["position"], "open": False}},
    ):
        assert differences(by_kind["json"], json.dumps(changed))
    table = by_kind["table"].expected
    assert differences(by_kind["table"], table.replace("100.42110097", "99.1")) == []
    assert differences(by_kind["table"], table.replace("status", "state"))
    assert differences(by_kind["table"], table.replace("BTC-USDT:SHORT", "BTC-USDT:LONG "))
    assert differences(by_kind["error"], by_kind["error"].expected.replace("10", "11"))
    assert differences(by_kind["status"], "0") and differences(by_kind["status"], "2")
