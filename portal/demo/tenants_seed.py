"""The demo's tenant side: a plan catalogue, the active tenants on plans, and the onboarding queue (Hooli Cloud's
verified sign-up, and one still waiting for its admin to verify their e-mail). Called from seed_demo inside its
transaction, after the tenants exist."""

from datetime import datetime, timedelta

from portal.accounts.models import User
from portal.capacity.models import Quota
from portal.capacity.services import quota_set
from portal.tenants.models import MemberRole, Membership, Plan, Tenant, TenantStatus

PLANS = (
    ("Starter", 500_000, 8, "Evaluate and launch: one model on a few GPUs or MIG slices."),
    ("Growth", 3_000_000, 24, "Production traffic on dedicated GPUs, several models."),
    ("Enterprise", 6_000_000, 48, "Large fleets of dedicated GPUs; limits negotiated per contract."),
)
TENANT_PLANS = {"acme": "Enterprise", "globex": "Enterprise", "initech": "Growth", "umbrella": "Growth"}


def seed_tenants(*, tenants: dict[str, Tenant], now: datetime) -> dict[str, Plan]:
    plans = {name: Plan.objects.create(name=name, tokens_per_minute=tpm, gpus=gpus, description=description)
             for name, tpm, gpus, description in PLANS}
    for slug, plan_name in TENANT_PLANS.items():
        tenant, plan = tenants[slug], plans[plan_name]
        tenant.plan = plan
        tenant.email_verified_at = tenant.status_changed_at = now - timedelta(days=45)
        tenant.save(update_fields=["plan", "email_verified_at", "status_changed_at"])
        if not Quota.objects.filter(tenant=tenant).exists():
            quota_set(tenant=tenant, tokens_per_minute=plan.tokens_per_minute, gpus=plan.gpus)
    hooli = tenants["hooli"]
    hooli.intended_models = "meta-llama/Llama-3.1-70B-Instruct\nQwen/Qwen2.5-32B-Instruct"
    hooli.expected_tokens_per_month = 40_000_000_000
    hooli.requested_capacity = "8 x NVIDIA H100 80GB HBM3 from next month; 2 x MIG 3g.40gb for evaluation now"
    hooli.email_verified_at = now - timedelta(hours=3)
    hooli.save(update_fields=["intended_models", "expected_tokens_per_month", "requested_capacity",
                              "email_verified_at"])
    piper = Tenant.objects.create(
        name="Pied Piper", slug="pied-piper", status=TenantStatus.PENDING,
        intended_models="mistralai/Mistral-7B-Instruct-v0.3", expected_tokens_per_month=900_000_000,
        requested_capacity="1 x MIG 1g.10gb",
    )
    user = User.objects.create_user(username="richard@piedpiper.example", email="richard@piedpiper.example",
                                    password=None, first_name="Richard", is_active=False)
    Membership.objects.create(user=user, tenant=piper, role=MemberRole.ADMIN)
    return plans
