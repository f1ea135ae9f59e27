"""The acceptance test before sale, against the real test sshd (tests/sshd.py): a planned node is provisioned and
tested into sale; a node that does not match its plan, or fails DCGM's diagnostics (real captured `dcgmi diag`
output), stays out of placement; an XID 79 cordons a held GPU, tells its tenant, marks the SLA window, and a new
acceptance test returns it to sale."""

import time
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import IntegrityError
from django.utils import timezone

from portal.capacity.selectors import placement_propose, replacements_propose
from portal.capacity.services import CapacityError, allocation_create
from portal.fleet.models import Gpu, Node, NodeLifecycle
from portal.fleet.services import node_credential_issue, nodes_plan
from portal.health.models import Cordon, Incident, TenantNotice
from portal.provisioning import services
from portal.provisioning.models import JobKind, JobStatus, ProvisioningJob, StepStatus
from portal.provisioning.parsing import HostSpec
from portal.sla.models import SlaEvaluation, SlaObjective, SlaPolicy, Sli
from portal.sla.services import sla_evaluate_tenant
from portal.telemetry.store import batches_store
from tests import FIXTURES
from tests.factories import OperatorFactory, SiteFactory, TenantFactory, admin_of, batch_payload, gpu_payload
from tests.sshd import sshd  # noqa: F401 -- the sshd fixture
from tests.test_ingest import post
from tests.test_provisioning_ssh import credential_for, kill_agent, steps

pytestmark = pytest.mark.django_db(transaction=True)

H100 = "NVIDIA H100 80GB HBM3"
DCGMI_STUB = """#!/bin/sh
# Stand-in for dcgmi: prints a real captured `dcgmi diag -r 2` run (tests/fixtures/ADDED.md).
[ "$1" = "diag" ] && [ "$2" = "-r" ] && [ "$3" = "2" ] || { echo "stub dcgmi: only diag -r 2" >&2; exit 2; }
cat {capture}
"""


@pytest.fixture(autouse=True)
def _fast(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    settings.ACCEPTANCE_SOAK_S = 2


@pytest.fixture
def install_dir(tmp_path):
    path = tmp_path / "opt" / "tokenmill-agent"
    yield path
    kill_agent(path)


def provision(server, operator, install_dir, live_server, *, name="sim-node-01", planned_gpus=None):
    """A node of the site, planned (when planned_gpus is given) and then provisioned on the test sshd; the job
    runs eagerly, install then acceptance."""
    site = SiteFactory()
    if planned_gpus is not None:
        nodes_plan(site=site, hostnames=[name], gpu_model=H100, gpus=planned_gpus, at=timezone.now(), by=operator)
    [job] = services.jobs_create(
        site=site, hosts=[HostSpec(user="root", host=server.host, port=server.port, name=name)],
        credential=credential_for(server, operator), install_dir=str(install_dir), simulate_gpus=1,
        portal_url=live_server.url, by=operator,
    )
    job.refresh_from_db()
    services.host_key_confirm(job=job, fingerprint_shown=job.offered_fingerprint, by=operator)
    job.refresh_from_db()
    assert job.status == JobStatus.DONE, job.error
    batches_store()  # what the store worker does with the agent's batches: the node is online
    node = Node.objects.get(hostname=name)
    return node, ProvisioningJob.objects.filter(node=node, kind=JobKind.BURN_IN).latest("pk")


def test_a_planned_node_is_provisioned_and_accepted_for_sale(sshd, install_dir, live_server):  # noqa: F811
    operator = OperatorFactory()
    node, burn_in = provision(sshd, operator, install_dir, live_server, planned_gpus=1)
    assert burn_in.status == JobStatus.DONE, burn_in.error
    assert "1 GPU(s) found by nvidia-smi: 0: NVIDIA H100 80GB HBM3" in steps(burn_in)["inventory"].output
    node.refresh_from_db()
    assert node.lifecycle == NodeLifecycle.SELLABLE
    assert [c.lifecycle for c in node.lifecycle_changes.all()] == [
        NodeLifecycle.PLANNED, NodeLifecycle.PROVISIONING, NodeLifecycle.BURN_IN, NodeLifecycle.SELLABLE]
    assert {p.gpu.node for p in placement_propose(gpu_type=H100, count=8, starts_at=timezone.now())} == {node}


def test_a_node_that_does_not_match_its_plan_stays_out_of_placement(sshd, install_dir, live_server):  # noqa: F811
    operator = OperatorFactory()
    node, burn_in = provision(sshd, operator, install_dir, live_server, planned_gpus=8)
    assert burn_in.status == JobStatus.FAILED
    assert burn_in.error == "GPUs against the plan and the baseline: 1 GPU(s) found, the plan expects 8"
    by_key = steps(burn_in)
    assert by_key["inventory"].status == StepStatus.FAILED
    assert {by_key[k].status for k in ("memory", "diagnostics", "soak", "accept")} == {StepStatus.PENDING}
    node.refresh_from_db()
    assert node.lifecycle == NodeLifecycle.BURN_IN
    assert placement_propose(gpu_type=H100, count=8, starts_at=timezone.now()) == []
    gpu = Gpu.objects.filter(node=node).first()
    with pytest.raises(CapacityError, match="burn-in, not sellable"):
        allocation_create(tenant=TenantFactory(), gpu=gpu, starts_at=timezone.now())


@pytest.mark.parametrize(("capture", "passes", "shown"), [
    ("dcgmi_diag_r2_awsome_distributed_training_efa_cheatsheet_a100.txt", True, "GPU Memory: pass (All)"),
    ("dcgmi_diag_r2_dcgm_issue253_comment_4.4.1_b200_pcie_fail_EXCERPT.txt", False, "pcie: fail"),
])
def test_it_runs_dcgm_diagnostics_where_dcgmi_is_installed(sshd, install_dir, live_server, settings,  # noqa: F811
                                                           capture, passes, shown):
    settings.ACCEPTANCE_DCGM_LEVEL = 2
    sshd.stub("dcgmi", DCGMI_STUB.replace("{capture}", str(FIXTURES / "added" / capture)))
    node, burn_in = provision(sshd, OperatorFactory(), install_dir, live_server)
    diagnostics = steps(burn_in)["diagnostics"]
    assert shown in diagnostics.output
    assert "self-test" not in diagnostics.output  # DCGM, not the agent's NVML check
    node.refresh_from_db()
    if passes:
        assert (burn_in.status, node.lifecycle) == (JobStatus.DONE, NodeLifecycle.SELLABLE)
    else:
        assert burn_in.status == JobStatus.FAILED and burn_in.error.startswith(
            "Diagnostics (DCGM, or the agent's self-test): dcgmi diag -r 2: pcie failed")
        assert node.lifecycle == NodeLifecycle.BURN_IN


def test_xid_79_cordons_the_gpu_and_a_passing_acceptance_test_returns_it(sshd, install_dir, live_server,  # noqa: F811
                                                                         client):
    operator = OperatorFactory()
    node, _burn_in = provision(sshd, operator, install_dir, live_server)
    assert node.lifecycle == NodeLifecycle.SELLABLE
    gpu = Gpu.objects.get(node=node)
    tenant = TenantFactory()
    admin_of(tenant, user__email="sre@tenant.example")
    allocation = allocation_create(tenant=tenant, gpu=gpu, starts_at=gpu.installed_at)
    policy = SlaPolicy.objects.create(name="gold", tenant=tenant)
    SlaObjective.objects.create(policy=policy, sli=Sli.AVAILABILITY, target=Decimal("99.9"), window=3600)

    # The XID 79 arrives in a batch of the node (a second credential, far from the running agent's seqs).
    at = time.time() - 5
    body = batch_payload(seq=10**9, end=time.time(), gpus=[gpu_payload(uuid=gpu.uuid, index=0)])
    body["host"].update(hostname=node.hostname, simulated=True)
    body["events"] = [{"ts": at, "gpu_uuid": gpu.uuid, "kind": "xid", "code": 79,
                       "detail": "GPU has fallen off the bus"}]
    assert post(client, body, node_credential_issue(node=node)).status_code == 200

    incident = Incident.objects.get(xid=79)
    cordon = Cordon.objects.get(ended_at__isnull=True)
    assert (cordon.node, cordon.incident, incident.gpu) == (node, incident, gpu)
    node.refresh_from_db()
    assert node.lifecycle == NodeLifecycle.CORDONED
    assert placement_propose(gpu_type=H100, count=1, starts_at=timezone.now()) == []
    notice = TenantNotice.objects.get(tenant=tenant)
    assert notice.incident == incident and notice.title == f"Cordoned GPU 0 of {node.hostname}"
    [replacement] = replacements_propose()
    assert replacement.allocation == allocation and replacement.proposal is None

    window_end = timezone.now().replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    sla_evaluate_tenant(tenant=tenant, window_end=window_end)
    assert SlaEvaluation.objects.get(tenant=tenant).incident == incident
    client.force_login(operator)
    page = client.get(f"/sla/tenants/{tenant.slug}/").content.decode()
    assert "Windows with a health incident" in page and incident.title in page

    again = services.burn_in_create(node=node, by=operator)
    again.refresh_from_db()
    assert again.status == JobStatus.DONE, again.error
    cordon.refresh_from_db()
    assert (cordon.end_reason, cordon.override) == (f"acceptance test passed (job {again.pk})", False)
    node.refresh_from_db()
    assert node.lifecycle == NodeLifecycle.SELLABLE
    assert [p.gpu for p in placement_propose(gpu_type=H100, count=1, starts_at=timezone.now())] == []  # still held
    assert replacements_propose() == []


def test_the_database_allows_one_active_job_per_node(sshd, install_dir, live_server):  # noqa: F811
    operator = OperatorFactory()
    node, burn_in = provision(sshd, operator, install_dir, live_server)
    ProvisioningJob.objects.filter(pk=burn_in.pk).update(status=JobStatus.QUEUED)
    with pytest.raises(services.ProvisioningError, match="still active"):
        services.burn_in_create(node=node, by=operator)
    with pytest.raises(IntegrityError):
        ProvisioningJob.objects.create(kind=JobKind.DECOMMISSION, status=JobStatus.QUEUED, site=node.site,
                                       node=node, node_name=node.hostname, created_at=timezone.now())
