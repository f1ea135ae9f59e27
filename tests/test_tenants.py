"""Tenants: sign-up and verification, onboarding by operators, members and invitations, API keys, the tenant
portal and the tenant API, the audit log."""

import re
from datetime import UTC, date, datetime, timedelta
from functools import partial

import pytest
from django.core import mail
from django.utils import timezone

from portal.accounts.models import User
from portal.audit.models import AuditEntry
from portal.capacity.models import CapacityRequest, Quota
from portal.capacity.selectors import tenant_usage_last_minute
from portal.capacity.services import allocation_create, deployment_create, quota_set
from portal.demo.tenants_seed import seed_tenants
from portal.fleet.models import MigInstance, ServingEndpoint
from portal.telemetry.models import UsageHour, UsageMinute
from portal.tenants.models import ApiKey, Invitation, MemberRole, Membership, Plan, Tenant, TenantStatus
from portal.tenants.selectors import tenant_overview
from portal.tenants.services import api_key_authenticate, api_key_create
from portal.tenants.tokens import verification_token
from tests.factories import (
    GpuFactory,
    MembershipFactory,
    NodeFactory,
    OperatorFactory,
    TenantFactory,
    UserFactory,
    ViewerFactory,
    gpu_uuid,
)

pytestmark = pytest.mark.django_db

STRONG = "violet-kettle-harbour-42"
H100 = "NVIDIA H100 80GB HBM3"


@pytest.fixture
def committed(django_capture_on_commit_callbacks):
    """Run on-commit callbacks (the mail tasks) of what happens inside `with committed():`."""
    return partial(django_capture_on_commit_callbacks, execute=True)


def signup_data(**overrides) -> dict:
    return {
        "organization": "Stark Compute", "admin_name": "Pepper Potts", "email": "pepper@stark.example",
        "password": STRONG, "intended_models": "meta-llama/Llama-3.1-70B-Instruct",
        "expected_tokens_per_month": "2000000000", "requested_capacity": "2 x H100", **overrides,
    }


def link_in(message, path: str) -> str:
    match = re.search(rf"http://testserver({re.escape(path)}\S+/)", message.body)
    assert match, message.body
    return match.group(1)


def admin_of(tenant: Tenant, **kwargs) -> User:
    return MembershipFactory(tenant=tenant, role=MemberRole.ADMIN, **kwargs).user


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


def counts() -> tuple[int, ...]:
    return (Tenant.objects.count(), User.objects.count(), Membership.objects.count(), AuditEntry.objects.count())


# Sign-up --------------------------------------------------------------------------------------------------------


class TestSignup:
    def test_it_signs_up_a_pending_tenant_whose_admin_verifies_by_mail(self, client, committed):
        with committed():
            response = client.post("/signup/", signup_data())
        assert response.status_code == 302 and response["Location"] == "/signup/sent/"
        tenant = Tenant.objects.get(slug="stark-compute")
        assert (tenant.name, tenant.status, tenant.email_verified_at) == ("Stark Compute", TenantStatus.PENDING, None)
        assert tenant.intended_models == "meta-llama/Llama-3.1-70B-Instruct"
        assert tenant.expected_tokens_per_month == 2_000_000_000
        assert tenant.requested_capacity == "2 x H100"
        user = User.objects.get(email="pepper@stark.example")
        assert (user.username, user.first_name, user.last_name, user.is_active) == (
            "pepper@stark.example", "Pepper", "Potts", False)
        assert user.check_password(STRONG)
        assert Membership.objects.get(user=user).tenant == tenant
        assert Membership.objects.get(user=user).role == MemberRole.ADMIN
        assert "pepper@stark.example" in client.get("/signup/sent/").content.decode()
        assert not client.login(username="pepper@stark.example", password=STRONG)  # not verified yet

        [message] = mail.outbox
        assert message.to == ["pepper@stark.example"]
        assert message.subject == "Verify your e-mail address for Tokenmill"
        link = link_in(message, "/signup/verify/")
        assert client.get(link).status_code == 200  # asks to confirm: mail scanners follow links
        response = client.post(link)
        assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")
        user.refresh_from_db()
        tenant.refresh_from_db()
        assert user.is_active
        assert tenant.email_verified_at is not None
        assert tenant.status == TenantStatus.PENDING  # an operator still has to approve it
        assert client.login(username="pepper@stark.example", password=STRONG)
        assert "Pending approval" in client.get("/tenant/").content.decode()
        assert list(AuditEntry.objects.filter(tenant=tenant).order_by("id").values_list("action", flat=True)) == [
            "tenant.signup", "tenant.verify_email"]
        assert client.post(link).status_code == 302  # following it again is harmless

    def test_it_refuses_forged_and_expired_verification_links(self, client, monkeypatch):
        tenant = TenantFactory(status=TenantStatus.PENDING)
        user = admin_of(tenant, user__is_active=False)
        token = verification_token(user=user)
        response = client.post(f"/signup/verify/{token[:-2]}xx/")
        assert response.status_code == 400
        assert "not valid" in response.content.decode()
        later = (timezone.now() + timedelta(days=3, minutes=1)).timestamp()
        monkeypatch.setattr("django.core.signing.time.time", lambda: later)
        response = client.post(f"/signup/verify/{token}/")
        assert response.status_code == 400
        assert "expired" in response.content.decode()
        user.refresh_from_db()
        assert not user.is_active

    def test_it_resends_the_link_to_an_unverified_admin_only(self, client, committed):
        tenant = TenantFactory(status=TenantStatus.PENDING)
        admin_of(tenant, user__email="late@example.com", user__is_active=False)
        with committed():
            assert client.post("/signup/verify/resend/", {"email": "late@example.com"}).status_code == 302
            assert client.post("/signup/verify/resend/", {"email": "nobody@example.com"}).status_code == 302
        assert [m.to for m in mail.outbox] == [["late@example.com"]]
        assert client.get("/signup/verify/resend/").status_code == 200
        assert client.post("/signup/verify/resend/", {"email": "not-an-address"}).status_code == 400

    @pytest.mark.parametrize(("overrides", "field", "message"), [
        ({"organization": "acme ai"}, "organization", "already registered"),
        ({"organization": "Acme-AI!"}, "organization", "already registered"),  # same slug
        ({"organization": "!!!"}, "organization", "letters or digits"),
        ({"organization": ""}, "organization", "required"),
        ({"email": "not-an-address"}, "email", "valid email"),
        ({"password": "1234567890"}, "password", "entirely numeric"),
        ({"password": "short"}, "password", "too short"),
        ({"password": "pepper@stark.example"}, "password", "too similar"),
        ({"expected_tokens_per_month": "-5"}, "expected_tokens_per_month", "greater than or equal to 0"),
    ])
    def test_it_names_the_field_and_creates_nothing(self, client, overrides, field, message):
        TenantFactory(name="Acme AI", slug="acme-ai")
        UserFactory(email="taken@example.com")
        before = counts()
        response = client.post("/signup/", signup_data(**overrides))
        assert response.status_code == 400
        errors = response.context["form"].errors
        assert list(errors) == [field]
        assert message in " ".join(errors[field]).lower()
        assert counts() == before
        assert mail.outbox == []

    def test_it_answers_a_known_address_as_any_other_and_tells_its_owner_by_mail(self, client, committed):
        # The page must not tell anyone which addresses are customers: the same redirect and "check your e-mail"
        # page as a new sign-up; only the address's owner learns, by mail, that it already has an account.
        UserFactory(email="taken@example.com", first_name="Tara")
        before = counts()
        with committed():
            known = client.post("/signup/", signup_data(email="Taken@Example.com", organization="Other Org"))
        assert known.status_code == 302 and known["Location"] == "/signup/sent/"
        assert counts() == before
        [message] = mail.outbox
        assert message.to == ["taken@example.com"] and message.subject == "Your Tokenmill account"
        assert "already has" in message.body and "/accounts/password-reset/" in message.body
        def main(response) -> str:
            return response.content.decode().split("<main", 1)[1].split("</main>", 1)[0]

        page = main(client.get("/signup/sent/"))
        with committed():
            new = client.post("/signup/", signup_data())
        assert (new.status_code, new["Location"]) == (known.status_code, known["Location"])
        assert main(client.get("/signup/sent/")).replace("pepper@stark.example", "taken@example.com") == page
        assert mail.outbox[1].subject == "Verify your e-mail address for Tokenmill"

    def test_it_rate_limits_signups_per_address(self, client, settings):
        settings.SIGNUP_RATE_LIMIT_PER_HOUR = 2
        for n in range(2):
            assert client.post("/signup/", signup_data(organization=f"Org {n}", email=f"a{n}@x.example")
                               ).status_code == 302
        response = client.post("/signup/", signup_data(organization="Org 3", email="a3@x.example"))
        assert response.status_code == 429
        text = response.content.decode()
        assert re.search(r"Too many sign-ups from your address, try again in \d+ minutes?\.", text)
        assert 0 < int(response["Retry-After"]) <= 3600
        assert not Tenant.objects.filter(name="Org 3").exists()
        other = client.post("/signup/", signup_data(organization="Org 4", email="a4@x.example"),
                            REMOTE_ADDR="10.9.9.9")
        assert other.status_code == 302


# Onboarding -----------------------------------------------------------------------------------------------------


class TestOnboarding:
    @pytest.fixture(autouse=True)
    def _setup(self, db, client):
        self.operator = OperatorFactory(username="olivia")
        self.plan = Plan.objects.create(name="Growth", tokens_per_minute=3_000_000, gpus=24)
        self.tenant = TenantFactory(name="Stark Compute", status=TenantStatus.PENDING,
                                    email_verified_at=timezone.now())
        self.admin = admin_of(self.tenant, user__email="pepper@stark.example")
        self.client = client
        client.force_login(self.operator)

    def test_it_queues_pending_signups_first(self):
        TenantFactory(name="Zeta Active", status=TenantStatus.ACTIVE)
        unverified = TenantFactory(name="Unverified Co", status=TenantStatus.PENDING)
        page = self.client.get("/tenants/")
        assert page.status_code == 200
        names = [t.name for t in page.context["page"]]
        assert names.index("Stark Compute") < names.index("Zeta Active")
        assert names.index("Unverified Co") < names.index("Zeta Active")
        assert [t.name for t in self.client.get("/tenants/?status=pending").context["page"]] == [
            "Stark Compute", "Unverified Co"]
        detail = self.client.get(f"/tenants/{unverified.pk}/").content.decode()
        assert "not yet" in detail

    def test_it_approves_on_a_plan_sets_the_quota_and_tells_the_admin(self, committed):
        with committed():
            response = self.client.post(f"/tenants/{self.tenant.pk}/approve/", {"plan": self.plan.pk})
        assert response.status_code == 302
        self.tenant.refresh_from_db()
        assert (self.tenant.status, self.tenant.plan) == (TenantStatus.ACTIVE, self.plan)
        quota = Quota.objects.get(tenant=self.tenant)
        assert (quota.tokens_per_minute, quota.gpus) == (3_000_000, 24)
        [message] = mail.outbox
        assert message.to == ["pepper@stark.example"]
        assert message.subject == "Stark Compute is approved on Tokenmill"
        assert "Growth plan" in message.body and f"http://testserver/tenant/{self.tenant.slug}/" in message.body
        entry = AuditEntry.objects.get(action="tenant.approve")
        assert (entry.actor, entry.tenant) == (self.operator, self.tenant)
        assert entry.before == {"status": "pending", "plan": None, "reason": ""}
        assert entry.after == {"status": "active", "plan": "Growth", "reason": "",
                               "quota_tokens_per_minute": 3_000_000, "quota_gpus": 24}

    def test_it_will_not_approve_before_the_email_is_verified(self):
        self.tenant.email_verified_at = None
        self.tenant.save()
        response = self.client.post(f"/tenants/{self.tenant.pk}/approve/", {"plan": self.plan.pk})
        assert response.status_code == 409
        assert "not verified" in response.content.decode()
        self.tenant.refresh_from_db()
        assert self.tenant.status == TenantStatus.PENDING
        assert not Quota.objects.filter(tenant=self.tenant).exists()
        assert not AuditEntry.objects.exists()

    def test_it_names_the_missing_plan_or_reason(self):
        response = self.client.post(f"/tenants/{self.tenant.pk}/approve/", {"plan": ""})
        assert response.status_code == 400 and list(response.context["approve"].errors) == ["plan"]
        response = self.client.post(f"/tenants/{self.tenant.pk}/reject/", {"reason": "  "})
        assert response.status_code == 400 and list(response.context["reason"].errors) == ["reason"]
        self.tenant.refresh_from_db()
        assert self.tenant.status == TenantStatus.PENDING

    def test_it_rejects_with_a_reason(self, committed):
        with committed():
            self.client.post(f"/tenants/{self.tenant.pk}/reject/", {"reason": "No business address."})
        self.tenant.refresh_from_db()
        assert (self.tenant.status, self.tenant.status_reason) == (TenantStatus.REJECTED, "No business address.")
        [message] = mail.outbox
        assert message.subject == "Your Tokenmill sign-up for Stark Compute"
        assert "Reason: No business address." in message.body
        assert AuditEntry.objects.get(action="tenant.reject").after["reason"] == "No business address."
        response = self.client.post(f"/tenants/{self.tenant.pk}/approve/", {"plan": self.plan.pk})
        assert response.status_code == 409  # rejected is final

    def test_it_suspends_and_reactivates(self, committed):
        self.client.post(f"/tenants/{self.tenant.pk}/approve/", {"plan": self.plan.pk})
        with committed():
            self.client.post(f"/tenants/{self.tenant.pk}/suspend/", {"reason": "Invoice 2026-10 unpaid."})
        self.tenant.refresh_from_db()
        assert self.tenant.status == TenantStatus.SUSPENDED
        with committed():
            self.client.post(f"/tenants/{self.tenant.pk}/reactivate/")
        self.tenant.refresh_from_db()
        assert self.tenant.status == TenantStatus.ACTIVE
        assert [m.subject for m in mail.outbox] == [
            "Stark Compute is suspended on Tokenmill", "Stark Compute is active again on Tokenmill"]
        assert "Invoice 2026-10 unpaid." in mail.outbox[0].body
        actions = list(AuditEntry.objects.filter(tenant=self.tenant).order_by("id").values_list("action", "before",
                                                                                                "after"))
        assert [(a, b["status"], c["status"]) for a, b, c in actions] == [
            ("tenant.approve", "pending", "active"), ("tenant.suspend", "active", "suspended"),
            ("tenant.reactivate", "suspended", "active")]
        assert self.client.post(f"/tenants/{self.tenant.pk}/reactivate/").status_code == 409

    def test_it_lets_only_operator_admins_decide(self, client):
        client.force_login(ViewerFactory())
        assert client.get(f"/tenants/{self.tenant.pk}/").status_code == 200
        assert client.post(f"/tenants/{self.tenant.pk}/approve/", {"plan": self.plan.pk}).status_code == 403
        client.force_login(self.admin)
        assert client.get("/tenants/").status_code == 403
        self.tenant.refresh_from_db()
        assert self.tenant.status == TenantStatus.PENDING

    def test_it_creates_and_edits_plans_with_audit(self):
        response = self.client.post("/tenants/plans/new/", {"name": "Starter", "tokens_per_minute": "500000",
                                                            "gpus": "8", "description": "Small"})
        assert response.status_code == 302
        plan = Plan.objects.get(name="Starter")
        self.client.post(f"/tenants/plans/{plan.pk}/", {"name": "Starter", "tokens_per_minute": "600000",
                                                        "gpus": "8", "description": "Small"})
        plan.refresh_from_db()
        assert plan.tokens_per_minute == 600_000
        entry = AuditEntry.objects.get(action="plan.update")
        assert (entry.before["tokens_per_minute"], entry.after["tokens_per_minute"]) == (500_000, 600_000)
        assert "600,000" in self.client.get("/tenants/plans/").content.decode()
        assert self.client.get("/tenants/plans/new/").status_code == 200
        response = self.client.post("/tenants/plans/new/", {"name": "Growth", "gpus": "-1"})
        assert response.status_code == 400
        assert set(response.context["form"].errors) == {"name", "gpus"}


# Members and invitations ----------------------------------------------------------------------------------------


class TestMembers:
    @pytest.fixture(autouse=True)
    def _setup(self, db, client):
        self.tenant = TenantFactory(name="Acme AI", slug="acme")
        self.admin = admin_of(self.tenant, user__email="boss@acme.example")
        self.client = client
        client.force_login(self.admin)

    def invite(self, committed, email="new@acme.example", role=MemberRole.MEMBER):
        with committed():
            return self.client.post("/tenant/acme/members/invite/", {"email": email, "role": role})

    def test_it_invites_a_new_person_who_creates_an_account(self, committed, client):
        assert self.invite(committed).status_code == 302
        [message] = mail.outbox
        assert message.to == ["new@acme.example"]
        assert message.subject == "You are invited to Acme AI on Tokenmill"
        link = link_in(message, "/signup/invitation/")
        client.logout()
        page = client.get(link)
        assert page.status_code == 200 and "Join Acme AI" in page.content.decode()
        response = client.post(link, {"name": "Wile Coyote", "password": "123"})
        assert response.status_code == 400 and list(response.context["form"].errors) == ["password"]
        response = client.post(link, {"name": "Wile Coyote", "password": STRONG})
        assert response.status_code == 302 and response["Location"] == "/tenant/acme/"
        membership = Membership.objects.get(user__email="new@acme.example")
        assert (membership.tenant, membership.role, membership.user.is_active) == (self.tenant, "member", True)
        assert client.get("/tenant/acme/").status_code == 200  # signed in
        assert client.get(link).status_code == 400  # used
        assert list(AuditEntry.objects.order_by("id").values_list("action", flat=True)) == [
            "invitation.create", "invitation.accept"]

    def test_it_lets_an_existing_user_accept_only_as_the_invited_address(self, committed, client):
        existing = UserFactory(email="known@example.com")
        self.invite(committed, email="known@example.com", role=MemberRole.ADMIN)
        link = link_in(mail.outbox[0], "/signup/invitation/")
        client.force_login(UserFactory())
        response = client.post(link)
        assert response.status_code == 400 and "sign in as that address" in response.content.decode()
        client.force_login(existing)
        assert client.post(link).status_code == 302
        assert Membership.objects.get(user=existing).role == MemberRole.ADMIN

    def test_it_withdraws_an_invitation(self, committed, client):
        self.invite(committed)
        invitation = Invitation.objects.get()
        assert self.client.post(f"/tenant/acme/invitations/{invitation.pk}/withdraw/").status_code == 302
        client.logout()
        response = client.get(link_in(mail.outbox[0], "/signup/invitation/"))
        assert response.status_code == 400 and "withdrawn" in response.content.decode()

    def test_it_names_the_field_of_a_bad_invitation(self, committed):
        member = MembershipFactory(tenant=self.tenant, role=MemberRole.MEMBER, user__email="m@acme.example")
        for email, message in (("m@acme.example", "already a member"), ("nope", "valid email")):
            response = self.invite(committed, email=email)
            assert response.status_code == 400
            assert message in " ".join(response.context["invite"].errors["email"]).lower()
        self.invite(committed)
        response = self.invite(committed)
        assert response.status_code == 400 and "open invitation" in str(response.context["invite"].errors["email"])
        assert Invitation.objects.count() == 1
        self.client.force_login(member.user)
        assert self.client.post("/tenant/acme/members/invite/", {"email": "x@y.example", "role": "member"}
                                ).status_code == 403

    def test_it_keeps_the_last_admin(self):
        me = Membership.objects.get(user=self.admin)
        response = self.client.post(f"/tenant/acme/members/{me.pk}/role/", {"role": "member"})
        assert response.status_code == 409 and "last admin" in response.content.decode()
        response = self.client.post(f"/tenant/acme/members/{me.pk}/remove/")
        assert response.status_code == 409
        me.refresh_from_db()
        assert me.role == MemberRole.ADMIN
        other = MembershipFactory(tenant=self.tenant, role=MemberRole.MEMBER)
        assert self.client.post(f"/tenant/acme/members/{other.pk}/role/", {"role": "admin"}).status_code == 302
        assert self.client.post(f"/tenant/acme/members/{me.pk}/role/", {"role": "member"}).status_code == 302
        me.refresh_from_db()
        assert me.role == MemberRole.MEMBER
        entry = AuditEntry.objects.filter(action="membership.role").latest("id")
        assert (entry.before["role"], entry.after["role"]) == ("admin", "member")
        assert self.client.post(f"/tenant/acme/members/{me.pk}/remove/").status_code == 403  # no longer admin

    def test_it_removes_a_member_and_refuses_a_bad_role(self):
        other = MembershipFactory(tenant=self.tenant, role=MemberRole.MEMBER)
        response = self.client.post(f"/tenant/acme/members/{other.pk}/role/", {"role": "owner"})
        assert response.status_code == 400 and "role:" in response.content.decode()
        assert self.client.post(f"/tenant/acme/members/{other.pk}/remove/").status_code == 302
        assert not Membership.objects.filter(pk=other.pk).exists()
        assert AuditEntry.objects.get(action="membership.remove").before["role"] == "member"


# API keys and the tenant API ------------------------------------------------------------------------------------


def api(client, path: str, key: str | None):
    headers = {"HTTP_AUTHORIZATION": f"Bearer {key}"} if key is not None else {}
    return client.get(f"/api/v1/tenant/{path}", **headers)


class TestApiKeys:
    @pytest.fixture(autouse=True)
    def _setup(self, db, client):
        self.tenant = TenantFactory(name="Acme AI", slug="acme")
        self.admin = admin_of(self.tenant)
        self.client = client
        client.force_login(self.admin)

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


class TestPortal:
    @pytest.fixture(autouse=True)
    def _setup(self, db, client):
        self.tenant = TenantFactory(name="Acme AI", slug="acme")
        self.admin = admin_of(self.tenant)
        self.client = client
        client.force_login(self.admin)

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
