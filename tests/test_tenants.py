"""Tenants: sign-up and verification, onboarding by operators, members and invitations (API keys, the tenant
portal and API, the audit log: test_tenant_access.py)."""

import re
from datetime import timedelta
from functools import partial

import pytest
from django.core import mail
from django.utils import timezone

from portal.accounts.models import User
from portal.audit.models import AuditEntry
from portal.capacity.models import Quota
from portal.tenants.models import Invitation, MemberRole, Membership, Plan, Tenant, TenantStatus
from portal.tenants.tokens import verification_token
from tests.factories import (
    MembershipFactory,
    OperatorFactory,
    TenantFactory,
    UserFactory,
    ViewerFactory,
    admin_of,
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


