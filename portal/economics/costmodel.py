"""The cost model: what an hour of one GPU costs a site. Defined once, here; attribution, site, node and deployment
figures and the what-if all call it.

A GPU-hour costs the site's capex depreciated straight-line over its months (730.5 hours a month) plus its other
opex per GPU-hour (space, staff, network, support), plus the energy the GPU measured (NVML's counter, or power x
time) x PUE x the price per kWh. Money is Decimal in the site's currency.
"""

from dataclasses import dataclass
from decimal import Decimal

from portal.fleet.models import Site

HOURS_PER_MONTH = Decimal("730.5")
MJ_PER_KWH = Decimal(3_600_000_000)  # millijoules, as NVML counts energy
JOULES_PER_KWH = Decimal(3_600_000)
MILLION = Decimal(1_000_000)
ZERO = Decimal(0)


def capex_per_gpu_hour(site: Site) -> Decimal:
    return site.gpu_capex / (site.depreciation_months * HOURS_PER_MONTH)


def fixed_per_gpu_hour(site: Site) -> Decimal:
    """The part of a GPU-hour that does not depend on load: depreciation and other opex."""
    return capex_per_gpu_hour(site) + site.other_opex_gpu_hour


def energy_cost(site: Site, kwh: Decimal) -> Decimal:
    return kwh * site.pue * site.energy_price_kwh


def kwh(energy_mj: int | float | Decimal) -> Decimal:
    return Decimal(energy_mj) / MJ_PER_KWH


@dataclass(frozen=True)
class CapacityCost:
    """What some GPU capacity cost over a period: its GPU-hours, the busy part of them, the energy it measured and
    the three cost parts."""

    gpu_hours: Decimal
    busy_gpu_hours: Decimal
    energy_kwh: Decimal
    capex: Decimal
    opex: Decimal
    energy: Decimal

    @property
    def total(self) -> Decimal:
        return self.capex + self.opex + self.energy

    def share(self, fraction: Decimal) -> "CapacityCost":
        """`fraction` of this capacity (a tenant's share of the GPU-hour, say): every part scales with it."""
        return CapacityCost(*(getattr(self, name) * fraction for name in CAPACITY_FIELDS))


CAPACITY_FIELDS = ("gpu_hours", "busy_gpu_hours", "energy_kwh", "capex", "opex", "energy")


def capacity_cost(*, site: Site, gpu_hours: Decimal, busy_gpu_hours: Decimal, energy_kwh: Decimal) -> CapacityCost:
    """The cost of `gpu_hours` of the site's GPUs that were busy for `busy_gpu_hours` and used `energy_kwh`."""
    return CapacityCost(gpu_hours=gpu_hours, busy_gpu_hours=min(busy_gpu_hours, gpu_hours), energy_kwh=energy_kwh,
                        capex=gpu_hours * capex_per_gpu_hour(site), opex=gpu_hours * site.other_opex_gpu_hour,
                        energy=energy_cost(site, energy_kwh))
