from django import forms
from django.utils import timezone

from portal.capacity.models import ENGINE_SETTINGS, Deployment
from portal.capacity.selectors import unit_name
from portal.fleet.models import Gpu, MigInstance, Node, NodeStatus
from portal.params import IdField, MomentField, PageField
from portal.tenants.models import Tenant, TenantStatus


class GpuChoiceField(forms.ModelChoiceField):
    def label_from_instance(self, obj: Gpu) -> str:
        return f"{obj.node.hostname} · GPU {obj.index} · {obj.name}"


class MigChoiceField(forms.ModelChoiceField):
    def label_from_instance(self, obj: MigInstance) -> str:
        return f"{obj.gpu.node.hostname} · {unit_name(obj.gpu, obj)}"


IN_SERVICE = Gpu.objects.exclude(node__status=NodeStatus.DECOMMISSIONED).filter(retired_at__isnull=True)


class UnitForm(forms.Form):
    """A unit in service: a whole GPU, or one MIG instance of it."""

    gpu = GpuChoiceField(queryset=IN_SERVICE.select_related("node").order_by("node__hostname", "index"), label="GPU")
    mig_instance = MigChoiceField(
        queryset=MigInstance.objects.filter(gpu__in=IN_SERVICE).select_related("gpu__node")
        .order_by("gpu__node__hostname", "gpu__index", "gi_id"),
        required=False, label="MIG instance (blank: the whole GPU)")

    def clean(self):
        data = super().clean()
        mig, gpu = data.get("mig_instance"), data.get("gpu")
        if mig and gpu and mig.gpu_id != gpu.pk:
            self.add_error("mig_instance", "This MIG instance is not on the chosen GPU.")
        return data


class AllocationForm(UnitForm):
    tenant = forms.ModelChoiceField(queryset=Tenant.objects.filter(status=TenantStatus.ACTIVE).order_by("name"))
    starts_at = MomentField(initial=timezone.now, label="From (UTC)")
    ends_at = MomentField(required=False, label="Until (UTC, blank: open-ended)")
    field_order = ["tenant", "gpu", "mig_instance", "starts_at", "ends_at"]

    def clean(self):
        data = super().clean()
        if data.get("ends_at") and data.get("starts_at") and data["ends_at"] <= data["starts_at"]:
            self.add_error("ends_at", "Must be after the start.")
        return data


class MoveForm(UnitForm):
    """The replacement unit a tenant's allocation moves to."""


class DeclineForm(forms.Form):
    reason = forms.CharField(max_length=500, widget=forms.Textarea(attrs={"rows": 2}))


class DeploymentForm(forms.Form):
    tenant = forms.ModelChoiceField(queryset=Tenant.objects.filter(status=TenantStatus.ACTIVE))
    node = forms.ModelChoiceField(queryset=Node.objects.order_by("hostname"))
    name = forms.CharField(max_length=120)
    model_name = forms.CharField(max_length=200, label="Model")
    engine = forms.ChoiceField(choices=Deployment.Engine.choices)
    metrics_url = forms.URLField(max_length=500, label="Metrics URL on the node", assume_scheme="http",
                                 help_text="e.g. http://127.0.0.1:8000/metrics")
    precision = forms.CharField(max_length=32, required=False, help_text="e.g. bf16, fp8, int4-awq")
    kv_cache_dtype = forms.CharField(max_length=32, required=False, label="KV-cache dtype")
    speculative_decoding = forms.CharField(max_length=64, required=False, help_text="e.g. eagle3, ngram")
    max_batch_size = forms.IntegerField(min_value=1, max_value=65536, required=False,
                                        help_text="The engine's limit on sequences per batch (vLLM max_num_seqs)")

    def engine_settings(self) -> dict:
        return {k: str(self.cleaned_data[k]) for k in ENGINE_SETTINGS if self.cleaned_data.get(k)}


class CapacityFilterForm(forms.Form):
    site = IdField(required=False)
    node = forms.CharField(max_length=253, required=False, label="Node (hostname contains)")
    gpu = forms.CharField(max_length=128, required=False, label="GPU model")
    tenant = IdField(required=False)
    state = forms.ChoiceField(choices=[("", "Free or held"), ("free", "Free"), ("held", "Held")], required=False)
    page = PageField()
