"""The tokens-per-dollar advisor: for each model served by several deployments on the same GPU model (and
currency), the measured tokens per unit of cost and goodput of each engine configuration, and the difference one
setting makes between two configurations that differ in it alone ("KV cache auto -> fp8_e4m3: +32 % tokens per
USD at equal goodput").

Tokens here are output (generated) tokens: engine settings change how fast a GPU decodes, while how many input
tokens come with each request is the tenant's traffic (it varies twofold between endpoints), so counting them
would credit a configuration with its tenants' prompt lengths.

Only measured hours count: a configuration's figures are its deployments' cost and tokens over the period
(economics.selectors.deployment_costs) and their goodput against each tenant's own targets (sla.goodput), and
each figure says how many deployment-hours with traffic it rests on. A difference resting on fewer than
MIN_HOURS hours on either side is shown as too few hours, not as advice.
"""

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime

from django.db.models import Count

from portal.capacity.models import ENGINE_SETTINGS, Deployment
from portal.economics.models import DeploymentHour
from portal.economics.selectors import Cost, DeploymentCost
from portal.sla.goodput import Goodput, goodput_for_deployments, latency_targets_of

MIN_HOURS = 24
# Goodput shares closer than this (in share, 0..1) are "equal goodput"; further apart, the trade is stated.
EQUAL_GOODPUT = 0.01


@dataclass(frozen=True)
class Config:
    engine: str
    settings: tuple[tuple[str, str], ...]  # the advised settings it records, sorted

    @property
    def label(self) -> str:
        shown = ", ".join(f"{ENGINE_SETTINGS[k]} {v}" for k, v in self.settings)
        return f"{Deployment.Engine(self.engine).label}: {shown or 'defaults'}"


@dataclass
class ConfigFigures:
    config: Config
    cost: Cost
    hours: int = 0  # deployment-hours with traffic
    deployments: list[str] = field(default_factory=list)
    tokens: int = 0
    good_tokens: int = 0
    measured_tokens: int = 0  # tokens whose goodput could be measured

    @property
    def goodput(self) -> float | None:
        return self.good_tokens / self.measured_tokens if self.measured_tokens else None

    @property
    def output_per_unit(self) -> int | None:
        """Output tokens per unit of currency (per dollar for USD)."""
        total = self.cost.total
        return int(self.cost.output_tokens / total) if total else None


@dataclass
class Finding:
    setting: str  # label of the one setting that differs ("Engine" when only the engine does)
    before: str
    after: str
    a: ConfigFigures
    b: ConfigFigures

    @property
    def change(self) -> float | None:
        """Relative change in output tokens per unit of cost from a to b."""
        ta, tb = self.a.output_per_unit, self.b.output_per_unit
        return (tb - ta) / ta if ta and tb is not None else None

    @property
    def goodput_change(self) -> float | None:
        ga, gb = self.a.goodput, self.b.goodput
        return None if ga is None or gb is None else gb - ga

    @property
    def equal_goodput(self) -> bool:
        delta = self.goodput_change
        return delta is not None and abs(delta) < EQUAL_GOODPUT

    @property
    def enough_hours(self) -> bool:
        return min(self.a.hours, self.b.hours) >= MIN_HOURS


@dataclass
class ModelAdvice:
    model_name: str
    gpu_name: str
    currency: str
    configs: list[ConfigFigures]
    findings: list[Finding]


def _config(deployment: Deployment) -> Config:
    picked = tuple(sorted((k, str(v)) for k, v in deployment.settings.items() if k in ENGINE_SETTINGS))
    return Config(engine=deployment.engine, settings=picked)


def _difference(a: Config, b: Config) -> tuple[str, str, str] | None:
    """The one setting two configurations differ in, as (label, a's value, b's value); None if not exactly one."""
    if a.engine != b.engine:
        if a.settings != b.settings:
            return None
        return "Engine", Deployment.Engine(a.engine).label, Deployment.Engine(b.engine).label
    sa, sb = dict(a.settings), dict(b.settings)
    differing = [k for k in sorted(set(sa) | set(sb)) if sa.get(k) != sb.get(k)]
    if len(differing) != 1:
        return None
    key = differing[0]
    return ENGINE_SETTINGS[key], sa.get(key, "off"), sb.get(key, "off")


def _hours_with_traffic(*, deployment_ids: list[int], start: datetime, end: datetime) -> dict[int, int]:
    return dict(DeploymentHour.objects.filter(deployment_id__in=deployment_ids, ts__gte=start, ts__lt=end,
                                              generation_tokens__gt=0)
                .values_list("deployment_id").annotate(n=Count("id")).order_by())


def _goodput(*, deployments: list[Deployment], start: datetime, end: datetime, now: datetime) -> dict[int, Goodput]:
    """Each deployment's goodput over the period against its own tenant's latency targets."""
    tenants = list({d.tenant_id: d.tenant for d in deployments}.values())
    _hours, per_deployment = goodput_for_deployments(deployments=deployments, targets=latency_targets_of(
        tenants=tenants), start=start, end=end, now=now, by_hour=False)
    return per_deployment


def tokens_per_dollar_advice(*, costs: list[DeploymentCost], start: datetime, end: datetime,
                             now: datetime) -> list[ModelAdvice]:
    """Per (model, GPU model, currency) served by two or more configurations: each configuration's figures and
    every pair that differs in one setting, best gain first."""
    deployments = Deployment.objects.select_related("tenant", "node").prefetch_related(
        "allocations__gpu").in_bulk([c.deployment_id for c in costs if c.cost.tokens])
    hours = _hours_with_traffic(deployment_ids=list(deployments), start=start, end=end)
    goodput = _goodput(deployments=list(deployments.values()), start=start, end=end, now=now)
    groups: dict[tuple[str, str, str], dict[Config, ConfigFigures]] = defaultdict(dict)
    for c in costs:
        deployment = deployments.get(c.deployment_id)
        if deployment is None:
            continue
        gpus = {a.gpu.name for a in deployment.allocations.all()}
        gpu_name = ", ".join(sorted(gpus)) or "no GPU"
        config = _config(deployment)
        figures = groups[(c.model_name, gpu_name, c.cost.currency)].setdefault(
            config, ConfigFigures(config=config, cost=Cost(currency=c.cost.currency)))
        figures.cost.add(c.cost)
        figures.hours += hours.get(c.deployment_id, 0)
        figures.deployments.append(deployment.name)
        g = goodput.get(c.deployment_id)
        if g is not None and g.good_tokens is not None:
            figures.measured_tokens += g.tokens
            figures.good_tokens += g.good_tokens
    advice = []
    for (model_name, gpu_name, currency), configs in sorted(groups.items()):
        if len(configs) < 2:
            continue
        ranked = sorted(configs.values(), key=lambda f: f.output_per_unit or 0)
        findings = []
        for i, a in enumerate(ranked):
            for b in ranked[i + 1:]:
                differs = _difference(a.config, b.config)
                if differs is not None:
                    findings.append(Finding(setting=differs[0], before=differs[1], after=differs[2], a=a, b=b))
        findings.sort(key=lambda f: (not f.enough_hours, -(f.change or 0)))  # advice first, best gain first
        advice.append(ModelAdvice(model_name=model_name, gpu_name=gpu_name, currency=currency,
                                  configs=ranked[::-1], findings=findings))
    return advice
