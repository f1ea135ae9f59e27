"""The health policy: XID batches become incidents, cordons take units out of placement and tell their holders,
the SLA windows they touch are marked, quiet incidents close, and cordons end only by acceptance or an audited
override."""

import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.core import mail
from django.utils import timezone

from portal.audit.models import AuditEntry
from portal.capacity.selectors import placement_propose, replacements_propose
from portal.capacity.services import CapacityError, allocation_create, allocation_move
from portal.fleet.models import Gpu, NodeLifecycle
from portal.health.catalog import CATALOG, Action
from portal.health.models import Cordon, HealthRule, Incident, TenantNotice
from portal.health.selectors import rules as health_rules
from portal.health.services import HealthError, cordon_open, cordon_override, incidents_close_quiet, rule_set
from portal.sla.models import SlaEvaluation, SlaObjective, SlaPolicy, Sli
from portal.sla.services import sla_evaluate_tenant
from tests.factories import (
    OperatorFactory,
    TenantFactory,
    ViewerFactory,
    admin_of,
    batch_payload,
    gpu_payload,
    gpu_uuid,
    node_with_credential,
)
from tests.test_ingest import post

pytestmark = pytest.mark.django_db

H100 = "NVIDIA H100 80GB HBM3"


@pytest.fixture
def fleet(client):
    """One node of two H100s that has reported, and a tenant holding GPU 1 since a day ago."""
    node, cred = node_with_credential()
    uuids = [gpu_uuid(), gpu_uuid()]
    batch = batch_payload(seq=1, gpus=[gpu_payload(uuid=u, index=i) for i, u in enumerate(uuids)],
                          end=time.time() - 60)
    assert post(client, batch, cred).status_code == 200
    Gpu.objects.filter(node=node).update(installed_at=timezone.now() - timedelta(days=2))
    gpus = list(Gpu.objects.filter(node=node).order_by("index"))
    tenant = TenantFactory()
    admin = admin_of(tenant, user__email="ops@tenant.example")
    allocation = allocation_create(tenant=tenant, gpu=gpus[1], starts_at=timezone.now() - timedelta(days=1))
    return node, cred, uuids, gpus, tenant, admin, allocation


def xid(client, cred, seq, uuid, code, at):
    """A batch whose interval holds one XID on the GPU `uuid` (an event names a GPU of its own batch)."""
    index = Gpu.objects.get(uuid=uuid).index
    body = batch_payload(seq=seq, end=at + 5, gpus=[gpu_payload(uuid=uuid, index=index)])
    body["events"] = [{"ts": at, "gpu_uuid": uuid, "kind": "xid", "code": code, "detail": f"xid {code}"}]
    assert post(client, body, cred).status_code == 200


def test_the_default_policy_is_nvidias_catalog_until_an_operator_saves_a_rule():
    rules = {r.xid: r for r in health_rules()}
    assert (rules[13].action, rules[48].action, rules[79].action) == (
        Action.NOTIFY_TENANT, Action.CORDON_GPU, Action.CORDON_NODE)
    assert rules[79].title == CATALOG[79].title and rules[79].nvidia_action == CATALOG[79].nvidia_action
    assert not HealthRule.objects.exists()


def test_it_cordons_on_xid_79_tells_the_holder_and_takes_the_node_out_of_placement(
        client, fleet, django_capture_on_commit_callbacks):
    node, cred, uuids, gpus, tenant, admin, allocation = fleet
    at = time.time() - 30
    with django_capture_on_commit_callbacks(execute=True):
        xid(client, cred, 2, uuids[1], 79, at)

    incident = Incident.objects.get()
    assert (incident.xid, incident.gpu, incident.action, incident.events) == (79, gpus[1], Action.CORDON_NODE, 1)
    assert incident.opened_at == datetime.fromtimestamp(at, UTC)
    cordon = Cordon.objects.get()
    assert (cordon.scope, cordon.incident, cordon.ended_at) == ("node", incident, None)
    node.refresh_from_db()
    assert node.lifecycle == NodeLifecycle.CORDONED
    assert placement_propose(gpu_type=H100, count=2, starts_at=timezone.now()) == []
    with pytest.raises(CapacityError, match="cordoned, not sellable"):
        allocation_create(tenant=TenantFactory(), gpu=gpus[0], starts_at=timezone.now())

    notice = TenantNotice.objects.get()
    assert (notice.tenant, notice.incident, notice.unit) == (tenant, incident, f"GPU 1 of {node.hostname}")
    assert notice.title == f"Cordoned GPU 1 of {node.hostname}"
    assert "out of placement until it passes its acceptance test" in notice.body
    assert [m.to for m in mail.outbox] == [[admin.email]]
    assert mail.outbox[0].subject == f"{notice.title} ({tenant})"
    [replacement] = replacements_propose()
    assert (replacement.allocation, replacement.cordon, replacement.proposal) == (allocation, cordon, None)


def test_a_node_wide_incident_tells_every_holder_on_the_node_and_a_gpu_one_only_its_own(client, fleet):
    node, cred, uuids, gpus, tenant, *_ = fleet
    neighbour = TenantFactory()
    allocation_create(tenant=neighbour, gpu=gpus[0], starts_at=timezone.now() - timedelta(hours=1))
    xid(client, cred, 2, uuids[1], 48, time.time() - 60)  # the GPU: its holder only
    assert list(TenantNotice.objects.values_list("tenant", flat=True)) == [tenant.pk]
    xid(client, cred, 3, uuids[1], 79, time.time() - 30)  # the node: everyone on it
    notices = TenantNotice.objects.filter(incident__xid=79)
    assert sorted(notices.values_list("tenant", "unit")) == sorted([
        (tenant.pk, f"GPU 1 of {node.hostname}"), (neighbour.pk, f"GPU 0 of {node.hostname}")])


def test_it_groups_a_burst_into_one_incident_and_opens_a_new_one_after_the_quiet_period(client, fleet):
    _node, cred, uuids, gpus, *_ = fleet
    rule_set(xid=94, action=Action.CORDON_GPU, quiet_minutes=10, note="", by=OperatorFactory())
    start = time.time() - 3600
    for seq, offset in enumerate((0, 60, 300, 840), start=2):  # 840 s: 9 min after the previous one
        xid(client, cred, seq, uuids[0], 94, start + offset)
    incident = Incident.objects.get()
    assert (incident.events, incident.gpu, incident.closed_at) == (4, gpus[0], None)
    assert Cordon.objects.get().scope == "GPU"

    xid(client, cred, 6, uuids[0], 94, start + 840 + 11 * 60)
    first, second = Incident.objects.order_by("opened_at")
    assert first.closed_at == first.last_event_at + timedelta(minutes=10)
    assert (second.events, second.closed_at) == (1, None)
    assert Cordon.objects.count() == 1  # the GPU keeps its first cordon until it passes acceptance

    assert incidents_close_quiet(now=second.last_event_at + timedelta(minutes=9)) == 0
    assert incidents_close_quiet(now=second.last_event_at + timedelta(minutes=10)) == 1
    second.refresh_from_db()
    assert second.closed_at == second.last_event_at + timedelta(minutes=10)


def test_an_application_fault_notifies_the_tenant_and_keeps_the_gpu_in_service(client, fleet):
    node, cred, uuids, gpus, *_ = fleet
    xid(client, cred, 2, uuids[1], 13, time.time() - 30)
    assert Incident.objects.get().action == Action.NOTIFY_TENANT
    assert not Cordon.objects.exists()
    notice = TenantNotice.objects.get()
    assert notice.title == f"Fault on GPU 1 of {node.hostname}" and "stays in service" in notice.body
    assert [p.gpu for p in placement_propose(gpu_type=H100, count=2, starts_at=timezone.now())] == [gpus[0]]


def test_an_unlisted_xid_is_recorded_only(client, fleet):
    _node, cred, uuids, *_ = fleet
    xid(client, cred, 2, uuids[0], 4242, time.time() - 30)
    assert Incident.objects.get().action == Action.RECORD
    assert not Cordon.objects.exists() and not TenantNotice.objects.exists()


def test_an_operator_admin_edits_a_rule_and_the_next_burst_follows_it(client, fleet):
    _node, cred, uuids, *_ = fleet
    operator = OperatorFactory()
    rule_set(xid=13, action=Action.CORDON_GPU, quiet_minutes=5, note="flaky", by=operator)
    entry = AuditEntry.objects.get(action="health.rule_set")
    assert entry.before["action"] == Action.NOTIFY_TENANT and entry.after["action"] == Action.CORDON_GPU
    xid(client, cred, 2, uuids[0], 13, time.time() - 30)
    assert Cordon.objects.get().scope == "GPU"


def test_the_sla_marks_the_windows_of_an_incident_on_a_held_unit(client, fleet):
    node, cred, uuids, _gpus, tenant, *_ = fleet
    policy = SlaPolicy.objects.create(name="gold", tenant=tenant)
    SlaObjective.objects.create(policy=policy, sli=Sli.AVAILABILITY, target=Decimal("99"), window=3600)
    hour = timezone.now().replace(minute=0, second=0, microsecond=0)
    sla_evaluate_tenant(tenant=tenant, window_end=hour - timedelta(hours=1))  # before the incident
    xid(client, cred, 2, uuids[1], 79, (hour - timedelta(minutes=30)).timestamp())
    # The window already evaluated when the XID came in is marked by the store; the next one by the evaluation.
    sla_evaluate_tenant(tenant=tenant, window_end=hour)
    marks = dict(SlaEvaluation.objects.values_list("window_end", "incident__xid"))
    assert marks == {hour - timedelta(hours=1): None, hour: 79}

    operator = OperatorFactory()
    client.force_login(operator)
    page = client.get(f"/sla/tenants/{tenant.slug}/").content.decode()
    assert "Windows with a health incident" in page and "XID 79" in page and node.hostname in page


def test_a_late_xid_marks_a_window_already_evaluated(client, fleet):
    _node, cred, uuids, _gpus, tenant, *_ = fleet
    policy = SlaPolicy.objects.create(name="gold", tenant=tenant)
    SlaObjective.objects.create(policy=policy, sli=Sli.AVAILABILITY, target=Decimal("99"), window=3600)
    hour = timezone.now().replace(minute=0, second=0, microsecond=0)
    sla_evaluate_tenant(tenant=tenant, window_end=hour)
    assert SlaEvaluation.objects.get().incident is None
    xid(client, cred, 2, uuids[1], 48, (hour - timedelta(minutes=20)).timestamp())
    assert SlaEvaluation.objects.get().incident.xid == 48


def test_a_manual_mig_cordon_leaves_the_other_slices_in_placement_and_an_override_is_audited(fleet):
    node, _cred, _uuids, gpus, *_ = fleet
    Gpu.objects.filter(pk=gpus[0].pk).update(mig_mode=True)
    a = gpus[0].mig_instances.create(gi_id=1, profile="3g.40gb")
    b = gpus[0].mig_instances.create(gi_id=2, profile="3g.40gb")
    operator = OperatorFactory()
    cordon = cordon_open(node=node, gpu=gpus[0], mig_instance=a, at=timezone.now(), reason="slow", by=operator)
    offered = placement_propose(gpu_type=H100, count=2, mig_profile="3g.40gb", starts_at=timezone.now())
    assert [p.mig_instance for p in offered] == [b]
    assert cordon.incident.key == f"manual:mig:{a.pk}" and cordon.incident.action == Action.CORDON_GPU
    assert AuditEntry.objects.filter(action="health.cordon").count() == 1

    with pytest.raises(HealthError, match="say why"):
        cordon_override(cordon=cordon, reason="  ", by=operator)
    cordon_override(cordon=cordon, reason="vendor says fine", by=operator)
    cordon.refresh_from_db()
    assert (cordon.override, cordon.end_reason, cordon.ended_by) == (True, "vendor says fine", operator)
    assert cordon.incident.closed_at is not None
    entry = AuditEntry.objects.get(action="health.cordon_override")
    assert entry.after == {"reason": "vendor says fine"}
    with pytest.raises(HealthError, match="already ended"):
        cordon_override(cordon=cordon, reason="again", by=operator)
    assert len(placement_propose(gpu_type=H100, count=2, mig_profile="3g.40gb", starts_at=timezone.now())) == 2


def test_a_replacement_moves_the_tenant_to_a_free_unit_without_a_gap(client, fleet):
    node, cred, uuids, gpus, tenant, _admin, allocation = fleet
    _other, other_cred = node_with_credential(site=node.site)
    spare = gpu_uuid()
    assert post(client, batch_payload(seq=1, gpus=[gpu_payload(uuid=spare)], end=time.time() - 60),
                other_cred).status_code == 200
    Gpu.objects.filter(uuid=spare).update(installed_at=timezone.now() - timedelta(days=2))
    xid(client, cred, 2, uuids[1], 48, time.time() - 30)
    # The healthy GPU beside the cordoned one comes first: placement fills a node already in use.
    [replacement] = replacements_propose()
    assert replacement.proposal.gpu == gpus[0]
    moved = allocation_move(allocation=allocation, gpu=replacement.proposal.gpu, mig_instance=None, by=None)
    allocation.refresh_from_db()
    assert allocation.ends_at == moved.starts_at and moved.tenant == tenant
    assert replacements_propose() == []


class TestPages:
    def test_it_shows_the_policy_cordons_and_incidents_to_an_operator(self, client, fleet):
        node, cred, uuids, *_ = fleet
        xid(client, cred, 2, uuids[1], 48, time.time() - 30)
        client.force_login(ViewerFactory())
        page = client.get("/health/").content.decode()
        assert f'data-cordon="gpu:{Gpu.objects.get(uuid=uuids[1]).pk}"' in page
        assert f"XID 48 ({CATALOG[48].title}) on GPU 1 of {node.hostname}" in page
        assert '<tr data-xid="79">' in page and "Override" not in page  # a viewer reads only

    def test_an_operator_admin_edits_a_rule_and_a_bad_value_names_the_field(self, client):
        operator = OperatorFactory()
        client.force_login(operator)
        response = client.post("/health/rules/13/", {"xid13-action": "cordon_gpu", "xid13-quiet_minutes": "0",
                                                     "xid13-note": ""})
        assert response.status_code == 400 and "quiet_minutes" in response.content.decode()
        assert not HealthRule.objects.exists()
        response = client.post("/health/rules/13/", {"xid13-action": "cordon_gpu", "xid13-quiet_minutes": "15",
                                                     "xid13-note": "our model server crashes the GPU"})
        assert response.status_code == 302
        rule = HealthRule.objects.get(xid=13)
        assert (rule.action, rule.quiet_minutes, rule.updated_by, rule.title) == (
            Action.CORDON_GPU, 15, operator, CATALOG[13].title)

    def test_a_viewer_and_a_tenant_cannot_change_the_policy_or_cordons(self, client, fleet):
        node, _cred, _uuids, gpus, _tenant, admin, _allocation = fleet
        cordon = cordon_open(node=node, gpu=gpus[0], at=timezone.now(), reason="check")
        for user in (ViewerFactory(), admin):
            client.force_login(user)
            assert client.post("/health/rules/13/", {"xid13-action": "record", "xid13-quiet_minutes": "5"}
                               ).status_code == 403
            assert client.post(f"/health/cordons/{cordon.pk}/override/", {"reason": "x"}).status_code == 403
            assert client.post(f"/health/nodes/{node.pk}/cordon/", {"unit": "node", "reason": "x"}
                               ).status_code == 403
        cordon.refresh_from_db()
        assert cordon.ended_at is None and not HealthRule.objects.exists()
        assert Cordon.objects.count() == 1

    def test_an_operator_admin_cordons_a_gpu_from_the_node_page_and_overrides_it(self, client, fleet):
        node, _cred, _uuids, gpus, *_ = fleet
        client.force_login(OperatorFactory())
        response = client.post(f"/health/nodes/{node.pk}/cordon/", {"unit": f"gpu:{gpus[0].pk}", "reason": ""})
        assert response.status_code == 302 and not Cordon.objects.exists()
        client.post(f"/health/nodes/{node.pk}/cordon/", {"unit": f"gpu:{gpus[0].pk}", "reason": "fan noise"})
        cordon = Cordon.objects.get()
        assert (cordon.gpu, cordon.reason, cordon.started_by is not None) == (gpus[0], "fan noise", True)
        page = client.get(f"/fleet/nodes/{node.pk}/").content.decode()
        assert "GPU 0 cordoned since" in page and "fan noise" in page
        client.post(f"/health/cordons/{cordon.pk}/override/", {"reason": "fan replaced"})
        cordon.refresh_from_db()
        assert cordon.override and cordon.end_reason == "fan replaced"
