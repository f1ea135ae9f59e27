import hmac

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from portal.accounts.access import public
from portal.telemetry.exporter import FleetCollector


def _authorized(request: HttpRequest) -> bool:
    if request.user.is_authenticated and request.user.is_operator:
        return True
    token = settings.METRICS_BEARER_TOKEN
    header = request.headers.get("Authorization", "")
    return bool(token) and header.startswith("Bearer ") and hmac.compare_digest(header[7:].strip(), token)


@public
def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus scrape endpoint: `Authorization: Bearer $METRICS_BEARER_TOKEN` (or an operator's session)."""
    if not _authorized(request):
        return HttpResponse("metrics need a bearer token (METRICS_BEARER_TOKEN)\n", status=401,
                            content_type="text/plain", headers={"WWW-Authenticate": "Bearer"})
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector())
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
