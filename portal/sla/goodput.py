"""Live goodput: of a tenant's requests and tokens, the share that met each of its latency targets, per hour
and per deployment, from the merged histogram-bucket deltas (the same interpolation as the SLA quantiles:
portal.telemetry.histograms.share_at_most is quantile()'s inverse).

For a TTFT or end-to-end target the share is of requests; for an inter-token-latency target it is of the gaps
between tokens, so of tokens. A failed request never counts as good: each share is scaled by the requests that
succeeded. Good tokens are the tokens served x the lowest share of any of the tenant's targets: the engines
export each latency on its own, so which requests met every target at once is not known, and the lowest share
is the most that can have.
"""

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.utils import timezone

from portal.capacity.models import Deployment
from portal.capacity.selectors import deployment_windows, last_complete_minute, owned_usage
from portal.hours import hour_floor
from portal.sla.models import QUANTILE_SLIS, SlaObjective
from portal.sla.selectors import objectives_for_tenant, objectives_for_tenants, tenants_to_evaluate
from portal.telemetry.histograms import Histogram, merge, share_at_most
from portal.tenants.models import Tenant


@dataclass
class Goodput:
    """One scope's traffic against the tenant's latency targets (sli -> target in seconds)."""

    targets: dict[str, float]
    tokens: int = 0
    requests_ok: int = 0
    requests_failed: int = 0
    histograms: dict[str, Histogram | None] = field(default_factory=dict)

    def add(self, *, tokens: int, ok: int, failed: int, histograms: dict[str, Histogram | None]) -> None:
        self.tokens += tokens
        self.requests_ok += ok
        self.requests_failed += failed
        for name, h in histograms.items():
            self.histograms[name] = merge(self.histograms.get(name), h)

    @property
    def shares(self) -> dict[str, float | None]:
        """Per target, the share of requests (tokens, for ITL) that met it; None when nothing was measured."""
        requests = self.requests_ok + self.requests_failed
        succeeded = self.requests_ok / requests if requests else None
        out = {}
        for sli, target in self.targets.items():
            within = share_at_most(target, self.histograms.get(QUANTILE_SLIS[sli][0]))
            out[sli] = None if within is None or succeeded is None else within * succeeded
        return out

    @property
    def share(self) -> float | None:
        """The lowest share of any target (see the module's note)."""
        measured = [s for s in self.shares.values() if s is not None]
        return min(measured) if measured else None

    @property
    def good_tokens(self) -> int | None:
        share = self.share
        return None if share is None else int(self.tokens * share)


def latency_targets(objectives: list[SlaObjective]) -> dict[str, float]:
    return {o.sli: float(o.target) for o in objectives if o.sli in QUANTILE_SLIS}


def latency_targets_of(*, tenants: list[Tenant]) -> dict[int, dict[str, float]]:
    """Each tenant's latency targets (tenant id -> latency_targets), in two queries however many tenants."""
    return {pk: latency_targets(objectives) for pk, objectives in objectives_for_tenants(tenants=tenants).items()}


@dataclass
class TenantGoodput:
    targets: dict[str, float]
    hours: list[tuple[datetime, Goodput]]
    deployments: list[tuple[Deployment, Goodput]]
    total: Goodput


def _fields(targets: list[dict[str, float]]) -> tuple[str, ...]:
    names = sorted({QUANTILE_SLIS[sli][0] for t in targets for sli in t})
    return ("prompt_tokens", "generation_tokens", "requests_ok", "requests_failed", *names)


def goodput_for_deployments(*, deployments: list[Deployment], targets: dict[int, dict[str, float]], start: datetime,
                            end: datetime, now: datetime | None = None,
                            by_hour: bool = True) -> tuple[dict[datetime, Goodput], dict[int, Goodput]]:
    """Goodput of these deployments over [start, end), each against its tenant's targets (tenant id -> targets):
    per deployment, and per hour when the deployments are one tenant's (one query per usage tier)."""
    fields = _fields(list(targets.values()))
    names = fields[4:]
    tenant_of = {d.pk: d.tenant_id for d in deployments}
    if by_hour and len(set(tenant_of.values())) > 1:
        raise ValueError("goodput per hour sums one tenant's deployments against its targets")
    hour_targets = next(iter(targets.values()), {})
    hours: dict[datetime, Goodput] = defaultdict(lambda: Goodput(targets=hour_targets))
    per_deployment: dict[int, Goodput] = {}
    windows = deployment_windows(deployments, start, end)
    for window, ts, p, g, ok, failed, *values in owned_usage(windows=windows, now=now or timezone.now(),
                                                             fields=fields):
        histograms = dict(zip(names, values, strict=True))
        scope = per_deployment.get(window.deployment_id)
        if scope is None:
            scope = per_deployment[window.deployment_id] = Goodput(targets=targets.get(tenant_of[window.deployment_id],
                                                                                       {}))
        scopes = [scope] + ([hours[hour_floor(ts)]] if by_hour else [])
        for each in scopes:
            each.add(tokens=p + g, ok=ok, failed=failed, histograms=histograms)
    return dict(hours), per_deployment


def tenant_goodput(*, tenant: Tenant, start: datetime, end: datetime, now: datetime | None = None) -> TenantGoodput:
    """The tenant's goodput against its policy's latency targets, per hour (oldest first), per deployment and
    over the whole period."""
    targets = latency_targets(objectives_for_tenant(tenant=tenant))
    deployments = list(Deployment.objects.filter(tenant=tenant).order_by("name"))
    total = Goodput(targets=targets)
    if not targets:
        return TenantGoodput(targets=targets, hours=[], deployments=[], total=total)
    hours, per_deployment = goodput_for_deployments(deployments=deployments, targets={tenant.pk: targets},
                                                    start=start, end=end, now=now)
    for g in per_deployment.values():
        total.add(tokens=g.tokens, ok=g.requests_ok, failed=g.requests_failed, histograms=g.histograms)
    return TenantGoodput(targets=targets, hours=sorted(hours.items()),
                         deployments=[(d, per_deployment[d.pk]) for d in deployments if d.pk in per_deployment],
                         total=total)


@dataclass(frozen=True)
class FleetGoodput:
    minute: datetime
    good_tokens: int  # in the minute
    measured_tokens: int  # of deployments whose engines export a latency their tenant has a target for
    unmeasured_tokens: int  # of the others: no target, or no histogram for it
    tokens_per_s: float  # the fleet page's tokens/s now

    @property
    def share(self) -> float | None:
        """Of the tokens measured in the minute, the share that met their targets."""
        return self.good_tokens / self.measured_tokens if self.measured_tokens else None

    @property
    def good_tokens_per_s(self) -> float | None:
        """Tokens/s now x the share of all the minute's tokens known to have met their targets (an unmeasured
        token is not known to have): never more than the tokens/s beside it."""
        served = self.measured_tokens + self.unmeasured_tokens
        return self.tokens_per_s * self.good_tokens / served if served else None


def fleet_goodput_now(*, tokens_per_s: float, now: datetime | None = None) -> FleetGoodput:
    """The fleet page's headline: of the fleet's tokens/s now (economics.selectors.tokens_per_second_now), those
    that met their tenant's targets, at the share measured over the last complete, rolled-up minute (the one the
    tenant pages show: its histograms are merged; the raw minute's are still arriving)."""
    now = now or timezone.now()
    minute = last_complete_minute(now=now)
    tenants = list(tenants_to_evaluate())
    targets = latency_targets_of(tenants=tenants)
    _hours, per_deployment = goodput_for_deployments(
        deployments=list(Deployment.objects.filter(tenant__in=tenants)), targets=targets, start=minute,
        end=minute + timedelta(minutes=1), now=now, by_hour=False)
    measured = good = unmeasured = 0
    for g in per_deployment.values():
        if g.good_tokens is None:
            unmeasured += g.tokens
        else:
            measured += g.tokens
            good += g.good_tokens
    return FleetGoodput(minute=minute, good_tokens=good, measured_tokens=measured, unmeasured_tokens=unmeasured,
                        tokens_per_s=tokens_per_s)
