"""Taking a node out: stop and remove its agent, revoke its credential, release what tenants hold on it, and
retire it for the books."""

from django.utils import timezone

from portal.capacity.services import allocations_release_node
from portal.fleet.models import NodeStatus
from portal.fleet.services import credential_revoke, node_mark_status
from portal.provisioning.attempt import SYSTEMD_STATE_DIR, Outcome, Runner
from portal.provisioning.steps.install import UNIT_PATH, stop_detached
from portal.provisioning.steps.registry import step


@step("stop", "Stop and remove the agent", needs_ssh=True)
def step_stop(r: Runner) -> Outcome:
    out = Outcome()
    if r.job.init_system == "systemd":
        r.run(f"systemctl disable --now tokenmill-agent.service 2>/dev/null; rm -f {UNIT_PATH}; "
              f"systemctl daemon-reload; rm -rf {SYSTEMD_STATE_DIR} /var/lib/private/tokenmill-agent",
              "removing the unit")
        out.ok(f"unit stopped, disabled and removed; {SYSTEMD_STATE_DIR} removed")
    else:
        r.run(stop_detached(f"{r.q_dir}/agent.pid"), "stopping the agent")
        out.ok("detached agent stopped")
    r.run(f"rm -rf {r.q_dir}", f"removing {r.dir}")
    out.ok(f"{r.dir} removed (agent, virtualenv, wheels, configuration, credential)")
    return out


@step("revoke", "Revoke the node's credential", needs_ssh=False)
def step_revoke(r: Runner) -> Outcome:
    count = credential_revoke(node=r.job.node)
    out = Outcome()
    out.ok(f"{count} credential(s) revoked: the node's agent can no longer send")
    return out


@step("release", "Release allocations", needs_ssh=False)
def step_release(r: Runner) -> Outcome:
    count = allocations_release_node(node=r.job.node, at=timezone.now())
    out = Outcome()
    out.ok(f"{count} allocation(s) ended")
    return out


@step("mark", "Mark the node decommissioned", needs_ssh=False)
def step_mark(r: Runner) -> Outcome:
    job = r.job
    who = job.created_by.get_username() if job.created_by else "an operator"
    node_mark_status(node=job.node, status=NodeStatus.DECOMMISSIONED, at=timezone.now(),
                     reason=f"decommissioned by {who} (provisioning job {job.pk})")
    out = Outcome()
    out.ok(f"{job.node.hostname} is decommissioned")
    return out
