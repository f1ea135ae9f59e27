from django import forms

from portal.bringup.models import DEFAULT_TARGET_DAYS
from portal.provisioning.parsing import valid_node_name


class PlanForm(forms.Form):
    started_on = forms.DateField(label="Clock started on", help_text="YYYY-MM-DD",
                                 widget=forms.DateInput(attrs={"type": "date"}))
    target_days = forms.IntegerField(min_value=1, max_value=3650, initial=DEFAULT_TARGET_DAYS, label="Target days")
    soak_minutes = forms.IntegerField(min_value=0, max_value=7 * 24 * 60, initial=30, label="Soak minutes",
                                      help_text="How long a node runs without a health event before it is sold")
    note = forms.CharField(max_length=500, required=False)


class PlanLineForm(forms.Form):
    gpu_model = forms.CharField(max_length=128, label="GPU model", help_text="As NVML names it")
    nodes = forms.IntegerField(min_value=1, max_value=100_000)
    gpus_per_node = forms.IntegerField(min_value=1, max_value=64, label="GPUs per node", initial=8)


class PlannedNodesForm(forms.Form):
    line = forms.TypedChoiceField(coerce=int, label="Plan line")
    hostnames = forms.CharField(widget=forms.Textarea(attrs={"rows": 3}), label="Hostnames",
                                help_text="One per line, as the node will report itself")

    def __init__(self, *args, lines=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["line"].choices = [(line.pk, str(line)) for line in lines]

    def clean_hostnames(self) -> list[str]:
        names = [n.strip() for n in self.cleaned_data["hostnames"].splitlines() if n.strip()]
        if not names:
            raise forms.ValidationError("Give at least one hostname.")
        bad = [n for n in names if not valid_node_name(n)]
        if bad:
            raise forms.ValidationError(f"Not a valid hostname: {', '.join(bad[:5])}")
        if len(set(names)) != len(names):
            raise forms.ValidationError("A hostname is listed twice.")
        return names
