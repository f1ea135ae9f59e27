"""The simulated factory's load as pure functions of (seed, node, GPU or endpoint, time). The simulated agents
read it live (agents.simulate adds sampling noise around it) and the portal's demo seed integrates it over the
past, so seeded history flows into live readings without a step: the same load curve per node, the same idle
GPUs, the same throughput and latency per endpoint.

Figures: H100/A100 power and clocks from the nvidia-smi captures in tests/fixtures (see agents.simulate). Latency
is lognormal around a median that grows with load (queueing), as serving engines behave near saturation.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

NOISE_BUCKET_S = 300.0  # the load curve's noise moves every 5 minutes, linearly between buckets
GEN_TOKENS_PER_REQUEST = 220
FAILED_SHARE = 0.003
TTFT_LE = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
ITL_LE = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_LE = (1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0)
# vLLM V1's request-phase buckets (request_prefill_time_seconds, request_decode_time_seconds in the capture).
PHASE_LE = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
            480.0, 960.0, 1920.0, 7680.0)
SIGMA = {"ttft": 0.6, "itl": 0.35, "e2e": 0.5, "prefill": 0.5, "decode": 0.35}
# Engines that export time per request phase (only vLLM V1 does, of the engines the agent reads).
PHASE_ENGINES = frozenset({"vllm"})


def stable(*parts: object) -> int:
    """A seed from names: the same on every machine and run."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "big")


def daily_shape(hour_utc: float) -> float:
    """0.2 at 04:00 UTC, 1.0 at 16:00 UTC."""
    return 0.2 + 0.8 * (0.5 - 0.5 * math.cos(2 * math.pi * (hour_utc - 4.0) / 24.0))


class LoadCurve:
    """A node's load (0..1) at any time: the daily shape at the configured level, with noise of its own."""

    def __init__(self, sim, salt: str = ""):
        self.seed, self.level, self.salt = sim.seed, sim.load, salt
        self._cache: dict[int, float] = {}

    def _noise(self, bucket: int) -> float:
        value = self._cache.get(bucket)
        if value is None:
            if len(self._cache) > 4096:  # a month of buckets when the demo seeds its past; a live agent needs two
                self._cache.clear()
            value = self._cache[bucket] = random.Random(stable(self.seed, self.salt, bucket)).uniform(-1.0, 1.0)
        return value

    def __call__(self, t: float) -> float:
        hour = (t % 86400.0) / 3600.0
        pos = t / NOISE_BUCKET_S
        b = math.floor(pos)
        noise = self._noise(b) + (self._noise(b + 1) - self._noise(b)) * (pos - b)
        return max(0.0, min(1.0, self.level * daily_shape(hour) * (1.0 + 0.1 * noise)))


def gpu_factor(seed: int, hostname: str, index: int) -> float:
    """How much of the node's load this GPU carries (placement is never perfectly even)."""
    return random.Random(stable(seed, hostname, index, "factor")).uniform(0.85, 1.0)


def gpu_util(load: float, factor: float, serving: bool) -> float:
    """Utilization in percent: a GPU that serves no deployment idles."""
    return max(0.0, min(100.0, 100.0 * load * factor)) if serving and load > 0.01 else 0.0


def power_w(idle_w: float, limit_w: float, util: float) -> float:
    return idle_w + (limit_w * 0.93 - idle_w) * (util / 100.0) ** 0.85


def temperature_c(util: float) -> float:
    return 34.0 + 32.0 * util / 100.0


def memory_used_mib(total_mib: int, serving: bool) -> int:
    """A serving engine reserves most of the memory for its KV cache; an idle GPU holds nothing."""
    return int(total_mib * 0.88) if serving else 0


def mig_memory_used_mib(instance_mib: int, serving: bool) -> int:
    return int(instance_mib * 0.85) if serving else 0


@dataclass(frozen=True)
class EndpointProfile:
    capacity_tps: float  # generation tokens per second at full load
    prompt_ratio: float  # input tokens per output token
    ttft_base_s: float  # median time to first token when idle
    itl_base_s: float  # median inter-token latency when idle

    def generation_tps(self, load: float) -> float:
        return self.capacity_tps * load

    def ttft_median(self, load: float) -> float:
        return self.ttft_base_s * (1.0 + 3.0 * load**4)

    def itl_median(self, load: float) -> float:
        return self.itl_base_s * (1.0 + load * load)

    def e2e_median(self, load: float) -> float:
        return self.ttft_median(load) + self.itl_median(load) * GEN_TOKENS_PER_REQUEST

    def prefill_median(self, load: float) -> float:
        """The compute part of the time to first token (the rest is queueing): longer prompts take longer."""
        return self.ttft_base_s * (0.4 + 0.2 * self.prompt_ratio) * (1.0 + load)

    def decode_median(self, load: float) -> float:
        return self.itl_median(load) * GEN_TOKENS_PER_REQUEST

    def medians(self, load: float, *, phases: bool) -> dict[str, tuple[tuple[float, ...], float]]:
        """Each histogram the endpoint exports: its bounds and median latency at `load`."""
        out = {"ttft": (TTFT_LE, self.ttft_median(load)), "itl": (ITL_LE, self.itl_median(load)),
               "e2e": (E2E_LE, self.e2e_median(load))}
        if phases:
            out |= {"prefill": (PHASE_LE, self.prefill_median(load)), "decode": (PHASE_LE, self.decode_median(load))}
        return out


def endpoint_profile(seed: int, hostname: str, url: str, capacity_tps: float | None = None) -> EndpointProfile:
    """An endpoint's throughput and latency: its capacity as configured (the demo seed sets it from the model
    and the GPUs the deployment holds) or drawn once from its name; its prompt ratio and latency drawn once."""
    rng = random.Random(stable(seed, hostname, url, "profile"))
    drawn = rng.uniform(1500.0, 4000.0)
    return EndpointProfile(capacity_tps=drawn if capacity_tps is None else capacity_tps,
                           prompt_ratio=rng.uniform(1.5, 3.5), ttft_base_s=rng.uniform(0.05, 0.12),
                           itl_base_s=rng.uniform(0.012, 0.024))


def lognormal_hist(le: tuple[float, ...], n: int, median: float, sigma: float) -> tuple[list[int], float]:
    """Cumulative bucket counts (the last one +Inf) and sum of n lognormal observations around `median`."""
    mu = math.log(median)
    counts = [round(n * 0.5 * (1.0 + math.erf((math.log(b) - mu) / (sigma * math.sqrt(2))))) for b in le]
    counts = [min(c, n) for c in counts] + [n]
    for i in range(1, len(counts)):
        counts[i] = max(counts[i], counts[i - 1])
    return counts, n * math.exp(mu + sigma * sigma / 2.0)
