"""Create every topic in the registry (shared/topics.py); the broker auto-creates nothing.

    python -m shared.adapters.kafka_admin [--bootstrap 127.0.0.1:9092]

Idempotent: topics that exist are left alone (a partition count that differs from the
registry is reported, not "fixed"). Waits until every topic has a leader for every
partition, so a producer started right after does not race the metadata.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field

from kafka import KafkaAdminClient
from kafka.errors import TopicAlreadyExistsError, for_code

from shared.topics import ALL_TOPICS, TopicSpec


@dataclass
class EnsureReport:
    created: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # "name: wants 3 partitions, has 1"


def ensure_topics(
    bootstrap: str,
    specs: Iterable[TopicSpec] = ALL_TOPICS,
    *,
    replication: int | None = None,
    timeout_ms: int = 30_000,
    client_id: str = "smartlev-admin",
    verbose: bool = True,
) -> EnsureReport:
    """Create the topics in `specs` that do not exist; report what was done."""
    wanted = {spec.name: spec for spec in specs}
    report = EnsureReport()
    admin = KafkaAdminClient(
        bootstrap_servers=bootstrap.split(","),
        client_id=client_id,
        request_timeout_ms=timeout_ms,
    )
    try:
        requests = {
            spec.name: {
                "num_partitions": spec.partitions,
                "replication_factor": replication or spec.replication,
                "configs": spec.configs(),
            }
            for spec in wanted.values()
        }
        response = admin.create_topics(requests, timeout_ms=timeout_ms, raise_errors=False)
        for topic in response["topics"]:
            error = for_code(topic["error_code"])
            if topic["error_code"] == 0:
                report.created.append(topic["name"])
            elif error is TopicAlreadyExistsError:
                report.existing.append(topic["name"])
            else:
                message = topic.get("error_message") or error.__name__
                raise RuntimeError(f"cannot create topic {topic['name']}: {message}")
        admin.wait_for_topics(list(wanted), timeout_ms=timeout_ms)
        for described in admin.describe_topics(report.existing):
            spec = wanted[described["name"]]
            have = len(described["partitions"])
            if have != spec.partitions:
                report.mismatched.append(
                    f"{spec.name}: registry wants {spec.partitions} partitions, has {have}"
                )
    finally:
        admin.close()
    if verbose:
        for name in sorted(report.created):
            spec = wanted[name]
            print(f"created  {name:<22} partitions={spec.partitions} {spec.configs()}")
        for name in sorted(report.existing):
            print(f"exists   {name}")
        for line in report.mismatched:
            print(f"WARNING  {line}", file=sys.stderr)
    return report


def main(argv: list[str] | None = None) -> int:
    from shared.settings import ServiceSettings, from_environment

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", default=from_environment(ServiceSettings).kafka_bootstrap)
    parser.add_argument("--timeout-ms", type=int, default=30_000)
    parser.add_argument("--namespace", default="", help="prefix of every topic name")
    args = parser.parse_args(argv)
    specs = [spec.in_namespace(args.namespace) for spec in ALL_TOPICS]
    try:
        report = ensure_topics(args.bootstrap, specs, timeout_ms=args.timeout_ms)
    except Exception as exc:
        print(f"kafka_admin: cannot ensure topics on {args.bootstrap}: {exc}", file=sys.stderr)
        return 1
    print(
        f"==> {len(report.created)} created, {len(report.existing)} already existed "
        f"({len(report.created) + len(report.existing)} topics)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
