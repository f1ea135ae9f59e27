from django import forms

from portal.fleet.models import Site
from portal.standards.models import VERSION_FIELDS, CertifiedStack


class StackForm(forms.ModelForm):
    class Meta:
        model = CertifiedStack
        fields = ["name", *VERSION_FIELDS, "note"]
        labels = {"vllm_version": "vLLM"}  # Django capitalizes verbose names: "VLLM"

    def clean(self) -> dict:
        cleaned = super().clean()
        if not self.errors and not any(cleaned.get(name) for name in VERSION_FIELDS):
            self.add_error("driver_version", "Pin at least one version (the driver, CUDA or an engine).")
        return cleaned


class PolicyForm(forms.Form):
    # A choice, not a checkbox: a missing or unknown value is a 400 naming the field, never a silent "off".
    exclusion = forms.ChoiceField(label="Nodes off the certified stack", choices=[
        ("off", "Allow them in new placements"), ("on", "Exclude them from new placements")])
    note = forms.CharField(max_length=200, required=False, help_text="Why it changed, e.g. a ticket")

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("auto_id", "policy_%s")  # the stack form on the same page has its own id_note
        super().__init__(*args, **kwargs)


class DriftFilterForm(forms.Form):
    site = forms.ModelChoiceField(queryset=Site.objects.all(), required=False, empty_label="All sites")
