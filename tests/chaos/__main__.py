"""`python -m tests.chaos --seed N --cycles K [--infra]`: the kill/restart run against the
real stack, compared with an uninterrupted run; prints a summary, exit 1 on a failure."""

from __future__ import annotations

import argparse
import os
import sys

from tests.chaos.driver import ChaosFailure, Plan, run_pair

REDIS_URL = "redis://127.0.0.1:6379/0"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cycles", type=int, default=21)
    parser.add_argument("--speed", default="2500", help="replay pace, x real time")
    parser.add_argument(
        "--infra",
        action="store_true",
        help="also restart the shared Kafka broker and redis-server (stops everyone's work)",
    )
    parser.add_argument(
        "--bootstrap", default=os.environ.get("SMARTLEV_TEST_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    )
    parser.add_argument(
        "--redis-url", default=os.environ.get("SMARTLEV_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    args = parser.parse_args(argv)
    plan = Plan(seed=args.seed, cycles=args.cycles, speed=args.speed, infra=args.infra)
    print(
        f"chaos: seed {plan.seed}, {plan.cycles} faults, replay {plan.days[0]}..{plan.days[-1]} "
        f"at {plan.speed}x; schedule {plan.faults()}",
        flush=True,
    )
    try:
        reference, chaos, compared = run_pair(plan, args.bootstrap, args.redis_url)
    except ChaosFailure as exc:
        print(f"\nCHAOS FAILED (seed {plan.seed}): {exc}", file=sys.stderr)
        return 1
    survived = [f for f in chaos.faults if not f[1].endswith("(done)")]
    print(f"\n{'fault':<8}{'t (s)':>8}{'down (s)':>10}  target")
    for index, (at, target, down) in enumerate(chaos.faults, 1):
        print(f"{index:<8}{at:>8.1f}{down:>10.1f}  {target}")
    rows = [
        ("seed", plan.seed),
        ("kill/restart cycles survived", len(survived)),
        ("NAV ticks compared (exact)", compared),
        ("NavUpdateds re-sent identically", chaos.duplicates),
        ("orders (reconcile: once each)", len(chaos.orders)),
        (
            "dead letters (either run)",
            sum((*reference.dead_letters.values(), *chaos.dead_letters.values())),
        ),
        ("reconcile", chaos.reconcile),
        *(
            (f"unhealthy during {target} restart", ", ".join(sorted(names)) or "none seen")
            for target, names in sorted(chaos.unhealthy.items())
        ),
        ("namespaces", f"reference {reference.namespace} chaos {chaos.namespace}"),
    ]
    print()
    for name, value in rows:
        print(f"  {name:<34} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
