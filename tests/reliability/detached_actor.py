"""A detached actor for the head fault tests, run as a Ray job (``python -m
tests.reliability.detached_actor create|check NAME``): ``create`` starts a named, detached
counter on a GPU pool's node; ``check`` finds it by name and asks it, printing ``count=N``.
Detached actors outlive the job that made them; the test checks that they outlive the head."""

from __future__ import annotations

import sys

import ray

NAMESPACE = "rayplane-reliability"


@ray.remote(num_cpus=0, max_restarts=-1)
class Counter:
    def __init__(self) -> None:
        self.count = 0

    def bump(self) -> int:
        self.count += 1
        return self.count


def main(action: str, name: str, pool: str = "a100-timeslice") -> None:
    ray.init(namespace=NAMESPACE)
    if action == "create":
        actor = Counter.options(name=name, lifetime="detached",
                                resources={f"pool:{pool}": 0.01}).remote()
    else:
        actor = ray.get_actor(name)
    print(f"count={ray.get(actor.bump.remote(), timeout=60)}")


if __name__ == "__main__":
    main(*sys.argv[1:])
