"""What the ingest store does with a batch's health events, across apps: the health policy turns them into
incidents (cordons, tenant notices), then SLA windows those incidents overlap are marked. Health never calls the
SLA app itself; this module orders the two."""

from datetime import timedelta

from portal.fleet.models import HealthEvent
from portal.health.selectors import allocations_hit
from portal.health.services import health_events_apply
from portal.sla.services import sla_windows_mark


def health_apply(*, events: list[HealthEvent]) -> None:
    for incident in health_events_apply(events=events):
        end = incident.last_event_at + timedelta(seconds=1)
        for tenant in {a.tenant for a in allocations_hit(incident=incident)}:
            sla_windows_mark(tenant=tenant, start=incident.opened_at, end=end)
