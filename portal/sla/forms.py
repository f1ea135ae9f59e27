from django import forms

from portal.sla.models import Sli, Window
from portal.tenants.models import Plan, Tenant

RANGES = [(1, "24 hours"), (7, "7 days"), (30, "30 days")]


class RangeForm(forms.Form):
    days = forms.TypedChoiceField(choices=RANGES, coerce=int, required=False, empty_value=7)


class PolicyForm(forms.Form):
    name = forms.CharField(max_length=120)
    plan = forms.ModelChoiceField(queryset=Plan.objects.filter(sla_policy__isnull=True), required=False,
                                  help_text="The plan whose tenants it covers")
    tenant = forms.ModelChoiceField(queryset=Tenant.objects.filter(sla_override__isnull=True), required=False,
                                    help_text="Or one tenant, overriding its plan's policy")

    def clean(self):
        data = super().clean()
        if bool(data.get("plan")) == bool(data.get("tenant")):
            raise forms.ValidationError("Choose a plan or a tenant, not both.")
        return data


class ObjectiveForm(forms.Form):
    sli = forms.ChoiceField(choices=Sli.choices, label="Indicator")
    target = forms.DecimalField(min_value=0, max_digits=12, decimal_places=4,
                                help_text="Seconds for latencies; percent for availability and error rate")
    window = forms.TypedChoiceField(choices=Window.choices, coerce=int)
    credit_pct = forms.DecimalField(min_value=0, max_value=100, max_digits=5, decimal_places=2, initial=0,
                                    label="Credit %", help_text="Of the month's charges when the month misses it")

    def clean(self):
        data = super().clean()
        if data.get("sli") in (Sli.AVAILABILITY, Sli.ERROR_RATE) and data.get("target", 0) > 100:
            self.add_error("target", "A percentage is at most 100.")
        return data


class RemoveObjectiveForm(forms.Form):
    sli = forms.ChoiceField(choices=Sli.choices)
