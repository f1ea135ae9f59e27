"""The one registry of provisioning steps: each step is registered once, with its key, title, whether it needs the
SSH connection, and the function that runs it (it takes the attempt and returns an Outcome, or raises StepFailed
with the output the operator needs)."""

from collections.abc import Callable
from dataclasses import dataclass

from portal.provisioning.attempt import Outcome, Runner


@dataclass(frozen=True)
class Step:
    key: str
    title: str
    needs_ssh: bool
    run: Callable[[Runner], Outcome]


REGISTRY: dict[str, Step] = {}


def step(key: str, title: str, *, needs_ssh: bool) -> Callable[[Callable[[Runner], Outcome]], Callable]:
    """Register the decorated function as the step `key`."""
    def register(run: Callable[[Runner], Outcome]) -> Callable[[Runner], Outcome]:
        if key in REGISTRY:
            raise RuntimeError(f"provisioning step {key!r} is registered twice")
        REGISTRY[key] = Step(key=key, title=title, needs_ssh=needs_ssh, run=run)
        return run
    return register
