from django import forms

from portal.fleet.models import Site
from portal.standards.models import Baseline

VERSION_FIELDS = ["driver_version", "cuda_driver_version", "vllm_version", "tgi_version", "triton_version",
                  "sglang_version"]


class BaselineForm(forms.ModelForm):
    class Meta:
        model = Baseline
        fields = [*VERSION_FIELDS, "note"]
        labels = {"vllm_version": "vLLM"}  # Django capitalizes verbose names: "VLLM"

    def clean(self) -> dict:
        cleaned = super().clean()
        if not self.errors and not any(cleaned.get(name) for name in VERSION_FIELDS):
            self.add_error("driver_version", "Pin at least one version (the driver, CUDA or an engine).")
        return cleaned


class DriftFilterForm(forms.Form):
    site = forms.ModelChoiceField(queryset=Site.objects.all(), required=False, empty_label="All sites")
