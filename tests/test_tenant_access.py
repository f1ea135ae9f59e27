"""Tenants: API keys, the tenant portal and the tenant API, the audit log, the seeded plans."""

import re
from datetime import UTC, date, datetime, timedelta

import pytest
from django.utils import timezone

from portal.audit.models import AuditEntry
from portal.capacity.models import CapacityRequest, Quota
from portal.capacity.selectors import tenant_usage_last_minute
from portal.capacity.services import allocation_create, deployment_create, quota_set
from portal.demo.tenants_seed import seed_tenants
from portal.fleet.models import MigInstance, ServingEndpoint
from portal.telemetry.models import UsageHour, UsageMinute
from portal.tenants.models import ApiKey, MemberRole, Tenant, TenantStatus
from portal.tenants.selectors import tenant_overview
from portal.tenants.services import api_key_authenticate, api_key_create
from tests.factories import (
    GpuFactory,
    MembershipFactory,
    NodeFactory,
    OperatorFactory,
    TenantFactory,
    admin_of,
    gpu_uuid,
)

pytestmark = pytest.mark.django_db

H100 = "NVIDIA H100 80GB HBM3"


def deployment_with_endpoint(tenant: Tenant, *, model: str = "meta-llama/Llama-3.1-8B-Instruct",
                             url: str = "http://127.0.0.1:8000/metrics", name: str = "llama-8b",
                             active_from: datetime | None = None, up: bool = True, latency: float = 4.2):
    """A deployment on its own node and GPU, and the ServingEndpoint the agent reports for its metrics_url."""
    active_from = active_from or datetime(2026, 1, 1, tzinfo=UTC)
    node = NodeFactory()
    gpu = GpuFactory(node=node, uuid=gpu_uuid(), index=0, name=H100)
    allocation = allocation_create(tenant=tenant, gpu=gpu, starts_at=active_from)
    deployment = deployment_create(tenant=tenant, name=name, model_name=model, engine="vllm", node=node,
                                   metrics_url=url, allocations=[allocation], active_from=active_from)
    endpoint = ServingEndpoint.objects.create(node=node, url=url, model=model, engine="vllm", up=up,
                                              probe_latency_ms=latency)
    return deployment, endpoint


def usage(tier, endpoint: ServingEndpoint, ts: datetime, prompt: int, generation: int, ok: int = 1, failed: int = 0):
    return tier.objects.create(endpoint=endpoint, ts=ts, prompt_tokens=prompt, generation_tokens=generation,
                               requests_ok=ok, requests_failed=failed)


def api(client, path: str, key: str | None):
    headers = {"HTTP_AUTHORIZATION": f"Bearer {key}"} if key is not None else {}
    return client.get(f"/api/v1/tenant/{path}", **headers)


class SignedInAcmeAdmin:
    """Acme AI's admin, logged in."""

    @pytest.fixture(autouse=True)
    def _setup(self, db, client):
        self.tenant = TenantFactory(name="Acme AI", slug="acme")
        self.admin = admin_of(self.tenant)
        self.client = client
        client.force_login(self.admin)


class TestApiKeys(SignedInAcmeAdmin):

    def test_it_shows_a_new_key_once_and_stores_only_its_hash(self):
        response = self.client.post("/tenant/acme/api-keys/", {"name": "billing-export"})
        assert response.status_code == 201
        value = response.context["issued"].value
        assert re.fullmatch(r"tmk_[0-9a-f]{12}_\S+", value)
        assert value in response.content.decode()
        key = ApiKey.objects.get()
        assert (key.name, key.tenant, key.prefix) == ("billing-export", self.tenant, value.split("_")[1])
        assert value not in (key.digest, key.prefix) and len(key.digest) == 64
        listing = self.client.get("/tenant/acme/api-keys/").content.decode()
        assert value not in listing and f"tmk_{key.prefix}_…" in listing
        assert AuditEntry.objects.get(action="apikey.create").after == {"name": "billing-export",
                                                                         "prefix": key.prefix}

    def test_it_authenticates_until_revoked(self):
        value = self.client.post("/tenant/acme/api-keys/", {"name": "ci"}).context["issued"].value
        key = ApiKey.objects.get()
        assert api(self.client, "deployments", value).status_code == 200
        key.refresh_from_db()
        assert key.last_used_at is not None
        assert self.client.post(f"/tenant/acme/api-keys/{key.pk}/revoke/").status_code == 302
        assert api(self.client, "deployments", value).status_code == 401
        assert self.client.post(f"/tenant/acme/api-keys/{key.pk}/revoke/").status_code == 409
        assert AuditEntry.objects.filter(action="apikey.revoke").count() == 1

    def test_it_refuses_missing_malformed_forged_and_suspended_keys(self):
        value = api_key_create(tenant=self.tenant, name="k", by=self.admin).value
        forged = value[:-4] + ("AAAA" if not value.endswith("AAAA") else "BBBB")
        for bad in (None, "", "tmk_x", "tmn_" + value[4:], forged):
            assert api(self.client, "usage", bad).status_code == 401, bad
        self.tenant.status = TenantStatus.SUSPENDED
        self.tenant.save()
        assert api(self.client, "usage", value).status_code == 401

    def test_it_writes_last_used_at_most_once_a_minute(self):
        issued = api_key_create(tenant=self.tenant, name="k", by=self.admin)
        t0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
        api_key_authenticate(value=issued.value, now=t0)
        api_key_authenticate(value=issued.value, now=t0 + timedelta(seconds=59))
        issued.key.refresh_from_db()
        assert issued.key.last_used_at == t0
        api_key_authenticate(value=issued.value, now=t0 + timedelta(seconds=61))
        issued.key.refresh_from_db()
        assert issued.key.last_used_at == t0 + timedelta(seconds=61)

    def test_it_names_a_bad_key_name_and_refuses_keys_for_inactive_tenants(self):
        response = self.client.post("/tenant/acme/api-keys/", {"name": ""})
        assert response.status_code == 400 and list(response.context["form"].errors) == ["name"]
        self.tenant.status = TenantStatus.PENDING
        self.tenant.save()
        response = self.client.post("/tenant/acme/api-keys/", {"name": "early"})
        assert response.status_code == 400 and "pending" in response.content.decode().lower()
        assert not ApiKey.objects.exists()
        member = MembershipFactory(tenant=self.tenant, role=MemberRole.MEMBER).user
        self.client.force_login(member)
        assert self.client.get("/tenant/acme/api-keys/").status_code == 403


class TestTenantApi:
    @pytest.fixture(autouse=True)
    def _setup(self, db):
        self.tenant = TenantFactory(name="Acme AI", slug="acme")
        admin = admin_of(self.tenant)
        self.key = api_key_create(tenant=self.tenant, name="k", by=admin).value
        self.deployment, ep = deployment_with_endpoint(self.tenant, latency=3.5)
        _, ep2 = deployment_with_endpoint(self.tenant, model="Qwen/Qwen2.5-32B-Instruct", name="qwen",
                                          url="http://127.0.0.1:30000/metrics", up=False)
        d10, d11 = datetime(2026, 3, 10, tzinfo=UTC), datetime(2026, 3, 11, tzinfo=UTC)
        usage(UsageHour, ep, d10 + timedelta(hours=9), 1000, 400, ok=7)
        usage(UsageHour, ep, d10 + timedelta(hours=23), 10, 5, ok=1, failed=1)
        usage(UsageHour, ep, d11 + timedelta(hours=2), 2000, 600, ok=9)
        usage(UsageHour, ep2, d11 + timedelta(hours=5), 300, 30, ok=3)
        usage(UsageHour, ep, d11 + timedelta(days=1), 99999, 99999)  # outside the range asked
        # Another tenant's deployment: its usage is not Acme's.
        _, foreign = deployment_with_endpoint(TenantFactory(), url="http://127.0.0.1:8001/metrics")
        usage(UsageHour, foreign, d10 + timedelta(hours=9), 5555, 5555)

    def test_it_reports_usage_by_model_and_day(self, client):
        response = api(client, "usage?start=2026-03-10&end=2026-03-11", self.key)
        assert response.status_code == 200
        assert response.json() == {"tenant": "acme", "start": "2026-03-10", "end": "2026-03-11", "lines": [
            {"model": "meta-llama/Llama-3.1-8B-Instruct", "day": "2026-03-10", "prompt_tokens": 1010,
             "generation_tokens": 405, "tokens": 1415, "requests_ok": 8, "requests_failed": 1},
            {"model": "Qwen/Qwen2.5-32B-Instruct", "day": "2026-03-11", "prompt_tokens": 300,
             "generation_tokens": 30, "tokens": 330, "requests_ok": 3, "requests_failed": 0},
            {"model": "meta-llama/Llama-3.1-8B-Instruct", "day": "2026-03-11", "prompt_tokens": 2000,
             "generation_tokens": 600, "tokens": 2600, "requests_ok": 9, "requests_failed": 0},
        ]}

    @pytest.mark.parametrize(("query", "field", "message"), [
        ("start=2026-13-01", "start", ""),
        ("end=yesterday", "end", ""),
        ("start=2026-03-11&end=2026-03-10", "end", "end is before start"),
        ("start=2024-01-01&end=2026-03-10", "start", "longer than 366 days"),
    ])
    def test_it_names_a_bad_date(self, client, query, field, message):
        response = api(client, f"usage?{query}", self.key)
        assert response.status_code == 422
        [error] = response.json()["detail"]
        assert error["loc"][-1] == field
        assert message in error["msg"]

    def test_it_lists_deployments_with_their_health(self, client):
        body = api(client, "deployments", self.key).json()
        assert [(d["name"], d["model_name"], d["health"]["state"], d["health"]["probe_latency_ms"]) for d in body] == [
            ("llama-8b", "meta-llama/Llama-3.1-8B-Instruct", "up", 3.5),
            ("qwen", "Qwen/Qwen2.5-32B-Instruct", "down", 4.2)]
        one = api(client, f"deployments/{self.deployment.pk}", self.key).json()
        assert (one["id"], one["engine"], one["node"]) == (self.deployment.pk, "vllm", self.deployment.node.hostname)
        assert api(client, "deployments/999999", self.key).status_code == 404

    def test_it_is_in_the_published_openapi_document(self, client):
        paths = client.get("/api/v1/openapi.json").json()["paths"]
        assert {"/api/v1/tenant/usage", "/api/v1/tenant/deployments",
                "/api/v1/tenant/deployments/{deployment_id}"} <= set(paths)
        params = {p["name"] for p in paths["/api/v1/tenant/usage"]["get"]["parameters"]}
        assert params == {"start", "end"}


# The tenant portal ----------------------------------------------------------------------------------------------


class TestPortal(SignedInAcmeAdmin):

    def test_it_reports_today_month_the_last_minute_and_gpus_against_quota(self):
        now = datetime(2026, 3, 15, 12, 30, 20, tzinfo=UTC)
        _, ep = deployment_with_endpoint(self.tenant, active_from=datetime(2026, 2, 1, tzinfo=UTC))
        quota_set(tenant=self.tenant, tokens_per_minute=1000, gpus=2)
        # The last complete, rolled-up minute at 12:30:20 is 12:28, the one the quota is checked on.
        usage(UsageMinute, ep, datetime(2026, 3, 15, 12, 28, tzinfo=UTC), 200, 100)
        usage(UsageMinute, ep, datetime(2026, 3, 15, 12, 5, tzinfo=UTC), 150, 50)
        usage(UsageHour, ep, datetime(2026, 3, 15, 11, tzinfo=UTC), 700, 300)
        usage(UsageHour, ep, datetime(2026, 3, 14, 10, tzinfo=UTC), 4000, 1000)
        usage(UsageHour, ep, datetime(2026, 2, 28, 10, tzinfo=UTC), 6000, 1000)
        overview = tenant_overview(tenant=self.tenant, now=now)
        assert (overview.tokens_today, overview.tokens_month, overview.tokens_last_minute) == (1500, 6500, 300)
        assert overview.minute == datetime(2026, 3, 15, 12, 28, tzinfo=UTC)
        assert overview.tokens_last_minute == tenant_usage_last_minute(tenant=self.tenant, now=now)
        assert (overview.tokens_per_minute_quota, overview.minute_share) == (1000, 0.3)
        assert (overview.gpus_held, overview.gpus_quota, overview.gpu_share) == (1.0, 2, 0.5)

    def test_it_shows_deployments_health_and_usage(self):
        deployment, ep = deployment_with_endpoint(self.tenant, latency=6.24)
        hour = timezone.now().replace(minute=0, second=0, microsecond=0)
        usage(UsageMinute, ep, hour, 1234, 766)
        page = self.client.get("/tenant/acme/")
        assert page.status_code == 200
        assert page.context["overview"].tokens_today == 2000
        text = page.content.decode()
        assert "llama-8b" in text and "6.2 ms" in text and 'data-testid="health">up<' in text
        usage_page = self.client.get("/tenant/acme/usage/?days=7")
        assert [(t.model, t.tokens) for t in usage_page.context["totals"]] == [
            ("meta-llama/Llama-3.1-8B-Instruct", 2000)]
        chart = usage_page.context["chart"]
        assert chart["data"][0]["name"] == "meta-llama/Llama-3.1-8B-Instruct"
        assert len(chart["data"][0]["x"]) == 7 and chart["data"][0]["y"][-1] == 2000
        assert self.client.get("/tenant/acme/usage/?days=5").status_code == 400
        detail = self.client.get(f"/tenant/acme/deployments/{deployment.pk}/")
        assert [ln.tokens for ln in detail.context["lines"]] == [2000]

    def test_it_submits_a_capacity_request_from_the_fleets_gpu_types(self):
        gpu = GpuFactory(node=NodeFactory(), uuid=gpu_uuid(), index=0, name=H100, mig_mode=True)
        MigInstance.objects.create(gpu=gpu, gi_id=1, profile="3g.40gb")
        tomorrow = timezone.now().date() + timedelta(days=1)
        data = {"model_name": "meta-llama/Llama-3.1-70B-Instruct", "gpu_type": H100, "count": "2",
                "mig_profile": "3g.40gb", "starts_on": tomorrow.isoformat(), "note": "eval"}
        response = self.client.post("/tenant/acme/capacity/request/", data)
        assert response.status_code == 302
        request = CapacityRequest.objects.get()
        assert (request.tenant, request.requested_by, request.model_name, request.gpu_type, request.count,
                request.mig_profile, request.note) == (self.tenant, self.admin, data["model_name"], H100, 2,
                                                       "3g.40gb", "eval")
        assert request.starts_at == datetime.combine(tomorrow, datetime.min.time(), tzinfo=UTC)
        assert AuditEntry.objects.get(action="capacity_request.create").tenant == self.tenant
        listing = self.client.get("/tenant/acme/capacity/").content.decode()
        assert "meta-llama/Llama-3.1-70B-Instruct" in listing and "Open" in listing
        assert self.client.get(f"/tenant/acme/capacity/{request.pk}/").status_code == 200

    @pytest.mark.parametrize(("overrides", "field"), [
        ({"gpu_type": "NVIDIA B200"}, "gpu_type"),
        ({"count": "0"}, "count"),
        ({"mig_profile": "7g.80gb"}, "mig_profile"),
        ({"starts_on": "2020-01-01"}, "starts_on"),
        ({"model_name": ""}, "model_name"),
    ])
    def test_it_names_the_field_of_a_bad_capacity_request(self, overrides, field):
        GpuFactory(node=NodeFactory(), uuid=gpu_uuid(), index=0, name=H100)
        data = {"model_name": "m", "gpu_type": H100, "count": "1", "mig_profile": "",
                "starts_on": date.today().isoformat(), **overrides}
        response = self.client.post("/tenant/acme/capacity/request/", data)
        assert response.status_code == 400
        assert list(response.context["form"].errors) == [field]
        assert not CapacityRequest.objects.exists()

    def test_it_lets_only_admins_of_active_tenants_request_capacity(self):
        GpuFactory(node=NodeFactory(), uuid=gpu_uuid(), index=0, name=H100)
        data = {"model_name": "m", "gpu_type": H100, "count": "1", "starts_on": date.today().isoformat()}
        member = MembershipFactory(tenant=self.tenant, role=MemberRole.MEMBER).user
        self.client.force_login(member)
        assert self.client.get("/tenant/acme/capacity/").status_code == 200
        assert self.client.post("/tenant/acme/capacity/request/", data).status_code == 403
        self.client.force_login(self.admin)
        self.tenant.status = TenantStatus.PENDING
        self.tenant.save()
        response = self.client.post("/tenant/acme/capacity/request/", data)
        assert response.status_code == 400 and "once it is active" in response.content.decode()
        assert not CapacityRequest.objects.exists()


# Audit log ------------------------------------------------------------------------------------------------------


class TestAuditLog:
    def test_it_shows_operators_the_log_filtered_and_paginated(self, client):
        operator = OperatorFactory()
        acme, globex = TenantFactory(name="Acme AI"), TenantFactory(name="Globex")
        for n in range(55):
            AuditEntry.objects.create(actor=operator, actor_label=operator.username, tenant=acme,
                                      action="apikey.create", target=f"key {n}", after={"n": n})
        AuditEntry.objects.create(actor=operator, actor_label=operator.username, tenant=globex,
                                  action="tenant.suspend", target="Globex", before={"status": "active"},
                                  after={"status": "suspended"})
        client.force_login(operator)
        page = client.get("/audit/")
        assert page.status_code == 200
        assert page.context["page"].paginator.count == 56 and len(page.context["page"]) == 50
        assert len(client.get("/audit/?page=2").context["page"]) == 6
        only = client.get(f"/audit/?tenant={globex.pk}").context["page"]
        assert [e.action for e in only] == ["tenant.suspend"]
        assert client.get("/audit/?action=apikey.create").context["page"].paginator.count == 55
        text = client.get(f"/audit/?tenant={globex.pk}").content.decode()
        assert "suspended" in text and "tenant.suspend" in text
        assert client.get("/audit/?tenant=999999").status_code == 400
        partial_page = client.get("/audit/?action=tenant.suspend", HTTP_HX_REQUEST="true")
        assert partial_page.status_code == 200 and "<html" not in partial_page.content.decode()
        client.force_login(MembershipFactory().user)
        assert client.get("/audit/").status_code == 403


def test_it_seeds_plans_and_the_onboarding_queue():
    tenants = {slug: TenantFactory(slug=slug, status=TenantStatus.PENDING if slug == "hooli" else "active")
               for slug in ("acme", "globex", "initech", "umbrella", "hooli")}
    now = datetime(2026, 11, 1, tzinfo=UTC)
    quota_set(tenant=tenants["acme"], tokens_per_minute=123, gpus=4)
    plans = seed_tenants(tenants=tenants, now=now)
    assert sorted(plans) == ["Enterprise", "Growth", "Starter"]
    tenants["acme"].refresh_from_db()
    assert tenants["acme"].plan.name == "Enterprise"
    assert Quota.objects.get(tenant=tenants["acme"]).tokens_per_minute == 123  # a negotiated quota is kept
    assert Quota.objects.get(tenant=tenants["initech"]).tokens_per_minute == 3_000_000
    hooli = Tenant.objects.get(slug="hooli")
    assert hooli.status == TenantStatus.PENDING and hooli.email_verified_at is not None
    assert "Llama-3.1-70B" in hooli.intended_models
    assert Tenant.objects.get(slug="pied-piper").email_verified_at is None
