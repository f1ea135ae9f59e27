from django import forms

from portal.fleet.models import NodeStatus, Site
from portal.params import IdField
from portal.telemetry.selectors import RANGES


class EnrollmentTokenForm(forms.Form):
    site = forms.ModelChoiceField(queryset=Site.objects.all(), empty_label=None)
    hours = forms.IntegerField(min_value=1, max_value=24 * 14, initial=24, label="Valid for (hours)")
    note = forms.CharField(max_length=200, required=False, help_text="For example the rack or ticket")


class FleetFilterForm(forms.Form):
    site = IdField(required=False)
    status = forms.ChoiceField(choices=[("", "Any status"), *NodeStatus.choices], required=False)
    gpu = forms.CharField(max_length=128, required=False)
    tenant = IdField(required=False)


class NodeRangeForm(forms.Form):
    range = forms.ChoiceField(choices=[(key, key) for key in RANGES], required=False)
