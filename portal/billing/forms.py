from django import forms

from portal.billing.models import InvoiceStatus
from portal.params import DayField
from portal.tenants.models import Plan


class InvoiceFilterForm(forms.Form):
    month = DayField(required=False, input_formats=["%Y-%m"], help_text="YYYY-MM")
    status = forms.ChoiceField(choices=[("", "Any status"), *InvoiceStatus.choices], required=False)


class RunForm(forms.Form):
    month = DayField(input_formats=["%Y-%m"], help_text="A closed month, YYYY-MM")


class PriceBookForm(forms.Form):
    plan = forms.ModelChoiceField(queryset=Plan.objects.filter(price_book__isnull=True))
    currency = forms.CharField(max_length=3, min_length=3, initial="USD", help_text="ISO 4217, e.g. USD or EUR")


class PriceForm(forms.Form):
    model_name = forms.CharField(max_length=200, label="Model", help_text="As deployed, e.g. meta-llama/Llama-3.1-8B")
    effective_from = DayField(help_text="YYYY-MM-DD, today or later (UTC)")
    input_per_mtok = forms.DecimalField(min_value=0, max_digits=12, decimal_places=6,
                                        label="Input per 1M tokens")
    output_per_mtok = forms.DecimalField(min_value=0, max_digits=12, decimal_places=6,
                                         label="Output per 1M tokens")


class CommitmentForm(forms.Form):
    effective_from = DayField(help_text="YYYY-MM-DD, today or later; a month uses the one in force on its 1st")
    monthly_minimum = forms.DecimalField(min_value=0, max_digits=14, decimal_places=2)
