"""The tenant JSON API (/api/v1/tenant/...): Bearer API key (`tmk_...`, created in the tenant portal). The key
decides the tenant; every read goes through it, so no route takes a tenant id. tests/test_isolation.py walks every
route here."""

from datetime import date, datetime, timedelta
from typing import Annotated, Literal

from django.http import HttpRequest
from django.shortcuts import get_object_or_404
from django.utils import timezone
from ninja import Path, Query, Router, Schema, Status
from ninja.security import HttpBearer

from portal.capacity.models import Deployment
from portal.params import FIRST_DAY, ID_MAX, LAST_DAY
from portal.telemetry.schemas import ErrorOut
from portal.tenants.models import ApiKey
from portal.tenants.selectors import deployment_health, tenant_deployment_list, tenant_usage_by_day
from portal.tenants.services import api_key_authenticate

MAX_RANGE_DAYS = 366
DEFAULT_RANGE_DAYS = 30


class ApiKeyBearer(HttpBearer):
    def authenticate(self, request: HttpRequest, token: str) -> ApiKey | None:
        return api_key_authenticate(value=token)


router = Router(tags=["tenant"], auth=ApiKeyBearer())


class UsageLineOut(Schema):
    model: str
    day: date
    prompt_tokens: int
    generation_tokens: int
    tokens: int
    requests_ok: int
    requests_failed: int


class UsageOut(Schema):
    tenant: str
    start: date
    end: date
    lines: list[UsageLineOut]


class HealthOut(Schema):
    state: Literal["up", "down", "unknown"]
    probe_latency_ms: float | None
    last_seen: datetime | None


class DeploymentOut(Schema):
    id: int
    name: str
    model_name: str
    engine: str
    node: str
    active_from: datetime
    ended_at: datetime | None
    health: HealthOut


def _unprocessable(field: str, msg: str) -> Status:
    return Status(422, {"detail": [{"loc": ["query", field], "msg": msg, "type": "value_error"}]})


Day = Annotated[date | None, Query(None, ge=FIRST_DAY, le=LAST_DAY, description="A UTC date, YYYY-MM-DD")]
Id = Annotated[int, Path(ge=1, le=ID_MAX)]


@router.get("/tenant/usage", response={200: UsageOut, 401: ErrorOut, 422: ErrorOut},
            summary="Token and request usage per model and UTC day")
def usage(request: HttpRequest, start: Day = None, end: Day = None):
    """Usage of the key's tenant over the inclusive UTC date range `start`..`end` (default: the last 30 days up to
    today). Exact integers, as the agents reported them; days without usage are left out."""
    tenant = request.auth.tenant
    end = end or timezone.now().date()
    start = start or end - timedelta(days=DEFAULT_RANGE_DAYS - 1)
    if end < start:
        return _unprocessable("end", "end is before start")
    if (end - start).days >= MAX_RANGE_DAYS:
        return _unprocessable("start", f"the range is longer than {MAX_RANGE_DAYS} days")
    lines = tenant_usage_by_day(tenant=tenant, start=start, end=end)
    return Status(200, {"tenant": tenant.slug, "start": start, "end": end, "lines": [
        {"model": ln.model, "day": ln.day.date(), "prompt_tokens": ln.prompt_tokens,
         "generation_tokens": ln.generation_tokens, "tokens": ln.tokens, "requests_ok": ln.requests_ok,
         "requests_failed": ln.requests_failed}
        for ln in lines
    ]})


def _deployment_out(deployment: Deployment, health) -> dict:
    return {"id": deployment.pk, "name": deployment.name, "model_name": deployment.model_name,
            "engine": deployment.engine, "node": deployment.node.hostname, "active_from": deployment.active_from,
            "ended_at": deployment.ended_at, "health": {"state": health.state,
                                                        "probe_latency_ms": health.probe_latency_ms,
                                                        "last_seen": health.last_seen}}


@router.get("/tenant/deployments", response={200: list[DeploymentOut], 401: ErrorOut},
            summary="The tenant's deployments and their health")
def deployments(request: HttpRequest):
    items = list(tenant_deployment_list(tenant=request.auth.tenant))
    health = deployment_health(deployments=items)
    return Status(200, [_deployment_out(d, health[d.pk]) for d in items])


@router.get("/tenant/deployments/{deployment_id}",
            response={200: DeploymentOut, 401: ErrorOut, 404: ErrorOut, 422: ErrorOut},
            summary="One of the tenant's deployments and its health")
def deployment(request: HttpRequest, deployment_id: Id):
    item = get_object_or_404(tenant_deployment_list(tenant=request.auth.tenant), pk=deployment_id)
    return Status(200, _deployment_out(item, deployment_health(deployments=[item])[item.pk]))
