from decimal import Decimal

from django import forms

from portal.economics.split import SplitRule
from portal.fleet.models import Site
from portal.params import DayField


class EconomicsPeriodForm(forms.Form):
    period = forms.ChoiceField(choices=[("7d", "7 days"), ("30d", "30 days"), ("90d", "90 days")], required=False)
    all = forms.BooleanField(required=False, help_text="Every deployment, not only the best and worst")


class TokenTypesForm(forms.Form):
    period = forms.ChoiceField(choices=[("7d", "7 days"), ("30d", "30 days"), ("90d", "90 days")], required=False)
    rule = forms.ChoiceField(choices=SplitRule.choices, required=False, label="Split by")
    weight = forms.DecimalField(min_value=Decimal("0.1"), max_value=Decimal(100), max_digits=6, decimal_places=2,
                                required=False, label="Output weight",
                                help_text="Input tokens one output token weighs (the weighted rule)")


class BooksForm(forms.Form):
    month = DayField(required=False, input_formats=["%Y-%m"], help_text="YYYY-MM")


class WhatIfForm(forms.Form):
    site = forms.ModelChoiceField(queryset=Site.objects.none(), empty_label=None)
    utilization = forms.IntegerField(min_value=1, max_value=100, label="Utilization (%)",
                                     widget=forms.NumberInput(attrs={"type": "range", "step": 1}))
    allocation = forms.IntegerField(min_value=1, max_value=100, label="Allocated capacity (%)",
                                    widget=forms.NumberInput(attrs={"type": "range", "step": 1}))
    price = forms.DecimalField(min_value=Decimal("0.0001"), max_digits=10, decimal_places=4,
                               label="Blended price per 1M tokens")

    def __init__(self, *args, sites: list[Site], **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["site"].queryset = Site.objects.filter(pk__in=[s.pk for s in sites])
