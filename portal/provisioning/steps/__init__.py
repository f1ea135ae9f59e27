"""Provisioning steps, and the plan of each kind of job: the keys of its steps, in order (all in REGISTRY)."""

from portal.provisioning.models import JobKind
from portal.provisioning.steps import burnin, connect, decommission, install  # noqa: F401 -- they register
from portal.provisioning.steps.registry import REGISTRY, Step

PLANS: dict[str, tuple[str, ...]] = {
    JobKind.INSTALL: ("connect", "preflight", "upload", "install", "configure", "enroll", "start", "first_batch"),
    JobKind.BURN_IN: ("connect", "inventory", "memory", "diagnostics", "soak", "accept"),
    JobKind.DECOMMISSION: ("connect", "stop", "revoke", "release", "mark"),
}


def plan(kind: str) -> list[Step]:
    return [REGISTRY[key] for key in PLANS[kind]]
