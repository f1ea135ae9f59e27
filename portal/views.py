import logging

from django.conf import settings
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect

from portal.accounts.access import authenticated, public
from portal.celery import app as celery_app

log = logging.getLogger(__name__)


@authenticated
def home(request: HttpRequest) -> HttpResponse:
    if request.user.is_operator:
        return redirect("fleet:overview")
    return redirect("tenants:home")


@public
def healthz(request: HttpRequest) -> JsonResponse:
    """Liveness for load balancers: the database answers and the Celery broker accepts a connection."""
    checks = {}
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        checks["database"] = "ok"
    except Exception as exc:
        log.warning("healthz: database check failed: %s", exc)
        checks["database"] = "error"
    try:
        with celery_app.connection_for_write(settings.CELERY_BROKER_URL) as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = "ok"
    except Exception as exc:
        log.warning("healthz: broker check failed: %s", exc)
        checks["broker"] = "error"
    healthy = all(v == "ok" for v in checks.values())
    return JsonResponse({"status": "ok" if healthy else "error", "checks": checks}, status=200 if healthy else 503)
