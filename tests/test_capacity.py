import threading
from datetime import UTC, datetime, timedelta

import pytest
from django.db import close_old_connections, connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from portal.alerts.models import Alert
from portal.audit.models import AuditEntry
from portal.capacity.forms import AllocationForm
from portal.capacity.models import Allocation, CapacityRequest, Deployment, RequestStatus
from portal.capacity.selectors import capacity_overview, last_complete_minute, placement_propose, usage_for_tenant
from portal.capacity.services import (
    CapacityError,
    allocation_create,
    allocation_end,
    capacity_request_create,
    capacity_request_fulfil,
    deployment_create,
    deployment_end,
    quota_set,
    quotas_check,
)
from portal.fleet.models import Gpu, MigInstance, ScrapeTarget, ServingEndpoint
from portal.telemetry.models import UsageHour, UsageMinute
from tests.conftest import bad_parameters
from tests.factories import (
    PASSWORD,
    GpuFactory,
    NodeFactory,
    OperatorFactory,
    SiteFactory,
    TenantFactory,
    ViewerFactory,
    gpu_uuid,
)

T0 = datetime(2026, 11, 1, tzinfo=UTC)


def make_gpus(node, n=8, mig_index=None):
    gpus = [GpuFactory(node=node, uuid=gpu_uuid(), index=i, name="NVIDIA H100 80GB HBM3",
                               mig_mode=i == mig_index) for i in range(n)]
    migs = []
    if mig_index is not None:
        migs = [MigInstance.objects.create(gpu=gpus[mig_index], gi_id=gi, profile=p)
                for gi, p in ((2, "3g.40gb"), (3, "2g.20gb"), (9, "1g.10gb"), (10, "1g.10gb"))]
    return gpus, migs


@pytest.mark.django_db
class TestAllocations:
    def test_it_refuses_a_second_tenant_on_the_same_unit_and_time(self):
        a, b = TenantFactory(), TenantFactory()
        (gpu, *_), _ = make_gpus(NodeFactory(), n=1)
        allocation_create(tenant=a, gpu=gpu, starts_at=T0, ends_at=T0 + timedelta(days=10))
        with pytest.raises(CapacityError, match="already allocated"):
            allocation_create(tenant=b, gpu=gpu, starts_at=T0 + timedelta(days=9))
        allocation_create(tenant=b, gpu=gpu, starts_at=T0 + timedelta(days=10))  # back to back is fine
        assert Allocation.objects.count() == 2

    def test_the_database_itself_refuses_an_overlap(self):
        a, b = TenantFactory(), TenantFactory()
        (gpu, *_), _ = make_gpus(NodeFactory(), n=1)
        Allocation.objects.create(tenant=a, gpu=gpu, slot_lo=0, slot_hi=1000, starts_at=T0)
        from django.db import IntegrityError, transaction

        with pytest.raises(IntegrityError), transaction.atomic():
            Allocation.objects.create(tenant=b, gpu=gpu, slot_lo=0, slot_hi=1000, starts_at=T0 + timedelta(days=400))
        assert Allocation.objects.count() == 1

    def test_mig_instances_are_separate_units_but_a_whole_gpu_covers_them(self):
        a, b = TenantFactory(), TenantFactory()
        gpus, migs = make_gpus(NodeFactory(), n=1, mig_index=0)
        allocation_create(tenant=a, gpu=gpus[0], mig_instance=migs[0], starts_at=T0)
        allocation_create(tenant=b, gpu=gpus[0], mig_instance=migs[1], starts_at=T0)
        with pytest.raises(CapacityError, match=r"MIG 3g\.40gb"):
            allocation_create(tenant=b, gpu=gpus[0], mig_instance=migs[0], starts_at=T0 + timedelta(hours=1))
        with pytest.raises(CapacityError, match="The whole GPU"):
            allocation_create(tenant=b, gpu=gpus[0], starts_at=T0 + timedelta(hours=1))

    def test_ending_a_future_allocation_withdraws_it(self):
        tenant = TenantFactory()
        (gpu, *_), _ = make_gpus(NodeFactory(), n=1)
        current = allocation_create(tenant=tenant, gpu=gpu, starts_at=T0)
        assert allocation_end(allocation=current, at=T0 + timedelta(days=2)).ends_at == T0 + timedelta(days=2)
        future = allocation_create(tenant=tenant, gpu=gpu, starts_at=T0 + timedelta(days=5))
        assert allocation_end(allocation=future, at=T0 + timedelta(days=3)) is None
        assert list(Allocation.objects.values_list("pk", flat=True)) == [current.pk]


@pytest.mark.django_db(transaction=True)
def test_two_concurrent_allocations_of_one_gpu_one_wins():
    a, b = TenantFactory(), TenantFactory()
    (gpu, *_), _ = make_gpus(NodeFactory(), n=1)
    barrier = threading.Barrier(2)
    outcomes = []

    def allocate(tenant):
        try:
            barrier.wait(timeout=10)
            allocation_create(tenant=tenant, gpu=gpu, starts_at=T0)
            outcomes.append("ok")
        except CapacityError as exc:
            outcomes.append(str(exc))
        except Exception as exc:  # shown by the assertion below instead of lost in the thread
            outcomes.append(repr(exc))
        finally:
            close_old_connections()
            connection.close()

    threads = [threading.Thread(target=allocate, args=(t,)) for t in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    refusal = f"The whole GPU of GPU 0 on {gpu.node} is already allocated for part of that period."
    assert sorted(outcomes, key=len) == ["ok", refusal]
    assert Allocation.objects.count() == 1


@pytest.mark.django_db
class TestPlacementAndOverview:
    def test_it_fills_partly_used_nodes_first(self):
        tenant = TenantFactory()
        empty, partly = NodeFactory(hostname="a-empty"), NodeFactory(hostname="b-partly")
        make_gpus(empty, n=4)
        partly_gpus, _ = make_gpus(partly, n=4)
        allocation_create(tenant=tenant, gpu=partly_gpus[0], starts_at=T0)
        proposal = placement_propose(gpu_type="NVIDIA H100 80GB HBM3", count=4, starts_at=T0)
        assert [(p.gpu.node.hostname, p.gpu.index) for p in proposal] == [
            ("b-partly", 1), ("b-partly", 2), ("b-partly", 3), ("a-empty", 0)]

    def test_it_proposes_free_mig_instances_of_the_profile(self):
        tenant = TenantFactory()
        gpus, migs = make_gpus(NodeFactory(), n=1, mig_index=0)
        allocation_create(tenant=tenant, gpu=gpus[0], mig_instance=migs[2], starts_at=T0)
        proposal = placement_propose(gpu_type="NVIDIA H100 80GB HBM3", count=5, mig_profile="1g.10gb", starts_at=T0)
        assert [p.mig_instance.gi_id for p in proposal] == [10]

    def test_it_fulfils_a_request_all_or_nothing(self):
        admin, tenant, rival = OperatorFactory(), TenantFactory(), TenantFactory()
        gpus, _ = make_gpus(NodeFactory(), n=2)
        allocation_create(tenant=rival, gpu=gpus[1], starts_at=T0)
        request = capacity_request_create(tenant=tenant, by=None, model_name="m", gpu_type=gpus[0].name, count=2,
                                          starts_at=T0)
        with pytest.raises(CapacityError):
            capacity_request_fulfil(request=request, units=[(gpus[0], None), (gpus[1], None)], by=admin)
        assert Allocation.objects.filter(tenant=tenant).count() == 0
        request.refresh_from_db()
        assert request.status == RequestStatus.OPEN

    def test_the_overview_counts_whole_gpu_equivalents(self):
        tenant = TenantFactory()
        gpus, migs = make_gpus(NodeFactory(), n=4, mig_index=3)
        for g in gpus[:2]:
            g.current_util = 50.0
            g.save()
        allocation_create(tenant=tenant, gpu=gpus[0], starts_at=T0)
        allocation_create(tenant=tenant, gpu=gpus[3], mig_instance=migs[0], starts_at=T0)  # 3 of 7 slices
        allocation_create(tenant=tenant, gpu=gpus[2], starts_at=datetime.now(tz=UTC) + timedelta(days=3))
        (row,) = capacity_overview()
        assert row.total == 4 and row.allocated == pytest.approx(1 + 3 / 7) and row.committed == 1
        assert row.free == pytest.approx(4 - 1 - 3 / 7) and row.busy == 1.0
        assert row.idle_share_of_allocated == pytest.approx((0.5 + 3 / 7) / (1 + 3 / 7))


@pytest.mark.django_db
class TestDeploymentsAndUsage:
    def test_a_deployment_is_scraped_and_its_usage_belongs_to_its_tenant_while_live(self):
        tenant = TenantFactory()
        node = NodeFactory()
        gpus, _ = make_gpus(node, n=2)
        allocation = allocation_create(tenant=tenant, gpu=gpus[0], starts_at=T0)
        version = node.config_version
        url = "http://127.0.0.1:8000/metrics"
        deployment = deployment_create(tenant=tenant, name="llama", model_name="llama-8b", engine="vllm", node=node,
                                       metrics_url=url, allocations=[allocation], active_from=T0 + timedelta(hours=2))
        node.refresh_from_db()
        assert node.config_version == version + 1
        assert list(ScrapeTarget.objects.filter(node=node).values_list("url", flat=True)) == [url]
        endpoint = ServingEndpoint.objects.create(node=node, url=url, model="llama-8b", engine="vllm")
        for h in range(5):  # hours 0..4; the deployment starts at hour 2
            UsageHour.objects.create(endpoint=endpoint, ts=T0 + timedelta(hours=h), prompt_tokens=1000 * (h + 1),
                                     generation_tokens=10)
        UsageMinute.objects.create(endpoint=endpoint, ts=T0 + timedelta(hours=5, minutes=3), prompt_tokens=7,
                                   generation_tokens=3)
        deployment_end(deployment=deployment, at=T0 + timedelta(hours=5, minutes=30))
        (line,) = usage_for_tenant(tenant=tenant, start=T0, end=T0 + timedelta(days=1), by_day=False,
                                   now=T0 + timedelta(days=2))
        assert line.prompt_tokens == 3000 + 4000 + 5000 + 7 and line.generation_tokens == 33
        assert usage_for_tenant(tenant=TenantFactory(), start=T0, end=T0 + timedelta(days=1)) == []
        assert not ScrapeTarget.objects.filter(node=node).exists()

    def test_a_deployment_needs_the_tenants_units_on_its_node(self):
        tenant, other = TenantFactory(), TenantFactory()
        node = NodeFactory()
        gpus, _ = make_gpus(node, n=1)
        theirs = allocation_create(tenant=other, gpu=gpus[0], starts_at=T0)
        with pytest.raises(CapacityError, match="allocated to the tenant"):
            deployment_create(tenant=tenant, name="x", model_name="m", engine="vllm", node=node,
                              metrics_url="http://127.0.0.1:1/metrics", allocations=[theirs])
        assert not Deployment.objects.exists()

    def test_it_alerts_when_a_tenant_holds_more_gpus_than_its_quota(self):
        tenant = TenantFactory()
        gpus, _ = make_gpus(NodeFactory(), n=3)
        for g in gpus:
            allocation_create(tenant=tenant, gpu=g, starts_at=T0)
        quota_set(tenant=tenant, tokens_per_minute=None, gpus=2)
        assert quotas_check() == [f"quota:gpus:{tenant.pk}"]
        alert = Alert.objects.get(resolved_at__isnull=True)
        assert alert.title == f"{tenant} is over its GPUs held quota" and "3.00 used" in alert.detail
        quota_set(tenant=tenant, tokens_per_minute=None, gpus=4)
        assert quotas_check() == []
        assert Alert.objects.get().resolved_at is not None

    def test_a_tokens_quota_alert_counts_whole_tokens_of_the_minute_the_tenant_sees(self):
        tenant, node = TenantFactory(), NodeFactory()
        gpus, _ = make_gpus(node, n=1)
        url = "http://127.0.0.1:8000/metrics"
        deployment_create(tenant=tenant, name="llama", model_name="llama-8b", engine="vllm", node=node,
                          metrics_url=url, allocations=[allocation_create(tenant=tenant, gpu=gpus[0], starts_at=T0)],
                          active_from=T0)
        endpoint = ServingEndpoint.objects.create(node=node, url=url, model="llama-8b", engine="vllm")
        now = datetime(2026, 11, 3, 12, 30, 20, tzinfo=UTC)
        UsageMinute.objects.create(endpoint=endpoint, ts=last_complete_minute(now=now), prompt_tokens=1_200_000,
                                   generation_tokens=34_567)
        quota_set(tenant=tenant, tokens_per_minute=1_000_000, gpus=None)
        assert quotas_check(now=now) == [f"quota:tokens:{tenant.pk}"]
        assert Alert.objects.get().detail == "1,234,567 used against a quota of 1,000,000"


@pytest.mark.django_db
class TestCapacityPages:
    def test_an_operator_admin_allocates_from_the_page_and_conflicts_are_explained(self, client):
        admin = OperatorFactory()
        client.login(username=admin.username, password=PASSWORD)
        tenant, rival = TenantFactory(), TenantFactory()
        (gpu, *_), _ = make_gpus(NodeFactory(), n=1)
        r = client.post("/capacity/allocations/new/", {"tenant": tenant.pk, "gpu": gpu.pk,
                                                       "starts_at": "2026-11-01 00:00"})
        assert r.status_code == 302 and Allocation.objects.get().tenant == tenant
        r = client.post("/capacity/allocations/new/", {"tenant": rival.pk, "gpu": gpu.pk,
                                                       "starts_at": "2026-11-02 00:00"})
        assert r.status_code == 400 and "already allocated" in r.content.decode()
        r = client.post("/capacity/allocations/new/", {"tenant": rival.pk, "gpu": 999999, "starts_at": "soon"})
        assert r.status_code == 400 and set(r.context["form"].errors) == {"gpu", "starts_at"}
        assert Allocation.objects.count() == 1
        assert AuditEntry.objects.get().action == "allocation.create"

    def test_it_pages_nodes_and_filters_units_by_site_node_model_tenant_and_state(self, client):
        client.login(username=OperatorFactory().username, password=PASSWORD)
        site, other = SiteFactory(name="Ashburn"), SiteFactory(name="Frankfurt")
        nodes = [NodeFactory(site=site if i < 22 else other, hostname=f"iad-{i:02d}") for i in range(25)]
        for node in nodes:
            make_gpus(node, n=2)
        tenant = TenantFactory(name="Acme AI")
        held = Gpu.objects.get(node=nodes[3], index=1)
        allocation_create(tenant=tenant, gpu=held, starts_at=timezone.now() - timedelta(hours=1))
        page = client.get("/capacity/")
        assert page.context["page"].paginator.num_pages == 3 and len(page.context["nodes"]) == 10
        assert 'data-testid="next-page"' in page.content.decode()
        assert [g.node.hostname for g in client.get("/capacity/?page=3").context["nodes"]] == [
            f"iad-{i:02d}" for i in range(20, 25)]
        assert [g.node.hostname for g in client.get(f"/capacity/?site={other.pk}").context["nodes"]] == [
            "iad-22", "iad-23", "iad-24"]
        (group,) = client.get(f"/capacity/?tenant={tenant.pk}").context["nodes"]
        assert group.node == nodes[3] and [(u.label, u.holder.tenant.name) for u in group.units] == [
            ("GPU 1 (whole)", "Acme AI")]
        (group,) = client.get("/capacity/?node=iad-03&state=free").context["nodes"]
        assert [u.label for u in group.units] == ["GPU 0 (whole)"]
        assert len(client.get("/capacity/?state=held").context["nodes"]) == 1
        assert client.get("/capacity/?gpu=NVIDIA+A100-SXM4-80GB").context["page"].paginator.count == 0
        assert bad_parameters(client.get("/capacity/?page=0&site=x")) == {"page", "site"}

    def test_the_page_reads_a_constant_number_of_queries_whatever_the_fleet(self, client):
        client.login(username=OperatorFactory().username, password=PASSWORD)
        for i in range(3):
            make_gpus(NodeFactory(hostname=f"a-{i}"), n=8, mig_index=7)
        with CaptureQueriesContext(connection) as few:
            client.get("/capacity/")
        for i in range(20):
            make_gpus(NodeFactory(hostname=f"b-{i}"), n=8, mig_index=7)
        with CaptureQueriesContext(connection) as many:
            client.get("/capacity/")
        assert len(many.captured_queries) == len(few.captured_queries)

    def test_it_allocates_a_mig_instance_from_its_nodes_row_and_says_so_in_words(self, client):
        client.login(username=OperatorFactory().username, password=PASSWORD)
        node = NodeFactory(hostname="iad1-h100-09")
        gpus, migs = make_gpus(node, n=4, mig_index=3)
        tenant, rival = TenantFactory(name="Acme AI"), TenantFactory(name="Globex")
        page = client.get("/capacity/?node=h100-09").content.decode()
        assert f'data-unit="{gpus[3].pk}:{migs[0].pk}"' in page and "GPU 3 · MIG 3g.40gb (GI 2)" in page
        unit = {"gpu": gpus[3].pk, "mig_instance": migs[0].pk, "starts_at": "2026-11-20T08:00",
                "next": "/capacity/?node=h100-09"}
        r = client.post("/capacity/allocations/new/", {**unit, "tenant": tenant.pk}, follow=True)
        assert r.redirect_chain == [("/capacity/?node=h100-09", 302)]
        assert ("Allocated: Acme AI holds GPU 3 · MIG 3g.40gb (GI 2) on iad1-h100-09 from 2026-11-20 08:00 UTC, "
                "open-ended.") in r.content.decode()
        CapacityRequest.objects.create(tenant=rival, model_name="m", gpu_type="H100", count=1,
                                       starts_at=timezone.now())
        r = client.post("/capacity/allocations/new/", {**unit, "tenant": rival.pk})
        text = r.content.decode()
        assert r.status_code == 400 and text.count("is already allocated for part of that period") == 1
        assert "MIG 3g.40gb (GI 2) of GPU 3 on iad1-h100-09" in text and "No open requests." not in text
        form = AllocationForm()
        assert form.fields["gpu"].label_from_instance(gpus[0]) == f"iad1-h100-09 · GPU 0 · {gpus[0].name}"
        assert form.fields["mig_instance"].label_from_instance(migs[0]) == "iad1-h100-09 · GPU 3 · MIG 3g.40gb (GI 2)"

    def test_it_returns_only_to_pages_of_this_site_and_names_a_unit_it_cannot_read(self, client):
        admin = OperatorFactory()
        client.login(username=admin.username, password=PASSWORD)
        (gpu, *_), _ = make_gpus(NodeFactory(), n=1)
        r = client.post("/capacity/allocations/new/", {"tenant": TenantFactory().pk, "gpu": gpu.pk,
                                                       "starts_at": "2026-11-01 00:00",
                                                       "next": "https://evil.example/capacity/"})
        assert (r.status_code, r["Location"]) == (302, "/capacity/")
        allocation = Allocation.objects.get()
        r = client.post(f"/capacity/allocations/{allocation.pk}/release/", {"next": "//evil.example/"})
        assert (r.status_code, r["Location"]) == (302, "/capacity/")
        request = CapacityRequest.objects.create(tenant=TenantFactory(), model_name="m", gpu_type="H100", count=1,
                                                 starts_at=timezone.now())
        for unit in ("\u00b2", f"{gpu.pk}:\u00b9", "1:2:3"):
            r = client.post(f"/capacity/requests/{request.pk}/fulfil/", {"unit": unit}, follow=True)
            assert r.status_code == 200 and "does not name a unit; choose units from" in r.content.decode()
        assert Allocation.objects.count() == 1

    def test_viewers_see_capacity_but_cannot_change_it(self, client):
        viewer = ViewerFactory()
        client.login(username=viewer.username, password=PASSWORD)
        (gpu, *_), _ = make_gpus(NodeFactory(), n=1)
        assert client.get("/capacity/").status_code == 200
        assert client.post("/capacity/allocations/new/", {"tenant": TenantFactory().pk, "gpu": gpu.pk,
                                                          "starts_at": "2026-11-01 00:00"}).status_code == 403
