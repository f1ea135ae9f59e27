from django.db import models


class _AttributedCost(models.Model):
    """What a period of GPU capacity cost and how busy it was, in the site's currency."""

    gpu_hours = models.DecimalField(max_digits=20, decimal_places=8)
    busy_gpu_hours = models.DecimalField(max_digits=20, decimal_places=8)
    energy_kwh = models.DecimalField(max_digits=20, decimal_places=8)
    capex = models.DecimalField(max_digits=20, decimal_places=8)
    energy = models.DecimalField(max_digits=20, decimal_places=8)
    opex = models.DecimalField(max_digits=20, decimal_places=8)

    class Meta:
        abstract = True


class CostHour(_AttributedCost):
    """One hour of a site's cost attributed to the tenant holding the capacity, or to idle capacity (tenant null).
    Each GPU-hour (capex and opex per GPU-hour from the site's cost model, plus its measured energy x PUE x price)
    goes to the tenants holding it in proportion to time held and share of the GPU (MIG: slices/7); what nobody
    held is idle. The rows of an hour always add up to the site's cost for that hour."""

    site = models.ForeignKey("fleet.Site", on_delete=models.CASCADE, related_name="+")
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, null=True, blank=True, related_name="+")
    ts = models.DateTimeField()

    class Meta:
        indexes = [models.Index(fields=["ts", "site"]), models.Index(fields=["tenant", "ts"])]

    def __str__(self) -> str:
        return f"{self.site_id}/{self.tenant_id or 'idle'} @ {self.ts:%Y-%m-%d %H:%M}"

    @property
    def total(self):
        return self.capex + self.energy + self.opex


class _DeploymentPeriod(_AttributedCost):
    deployment = models.ForeignKey("capacity.Deployment", on_delete=models.CASCADE, related_name="+")
    ts = models.DateTimeField()
    prompt_tokens = models.BigIntegerField(default=0)
    generation_tokens = models.BigIntegerField(default=0)
    # Time its requests spent in prefill and in decode (the sums of vLLM's phase histograms; 0 where the engine
    # does not export them): the measured basis of the input/output cost split (economics.split).
    prefill_seconds = models.FloatField(default=0)
    decode_seconds = models.FloatField(default=0)

    class Meta:
        abstract = True


class DeploymentHour(_DeploymentPeriod):
    """One hour of a deployment: the cost of the GPU capacity its units held (the same per-GPU arithmetic as
    CostHour) and the tokens its endpoint served while it was live. Economics pages rank deployments from it."""

    class Meta:
        indexes = [models.Index(fields=["ts", "deployment"])]

    def __str__(self) -> str:
        return f"deployment {self.deployment_id} @ {self.ts:%Y-%m-%d %H:%M}"


class DeploymentDay(_DeploymentPeriod):
    """The sum of a deployment's DeploymentHour rows over a UTC day (ts is midnight), rewritten with them. A month
    of economics for a thousand deployments reads 30 thousand of these instead of 720 thousand hours."""

    class Meta:
        constraints = [models.UniqueConstraint(fields=["ts", "deployment"], name="deploymentday_ts_unique")]

    def __str__(self) -> str:
        return f"deployment {self.deployment_id} on {self.ts:%Y-%m-%d}"


class PendingAttribution(models.Model):
    """A range of past hours whose attribution a change made stale (an allocation or deployment reaching into the
    past, a decommissioning, an operator's request). Requests are merged: one background run re-attributes the
    union of every pending range, however many changes asked for it."""

    start = models.DateTimeField()
    end = models.DateTimeField()
    requested_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.start:%Y-%m-%d %H:%M} to {self.end:%Y-%m-%d %H:%M}"
