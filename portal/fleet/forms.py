from django import forms

from portal.fleet.models import Site


class EnrollmentTokenForm(forms.Form):
    site = forms.ModelChoiceField(queryset=Site.objects.all(), empty_label=None)
    hours = forms.IntegerField(min_value=1, max_value=24 * 14, initial=24, label="Valid for (hours)")
    note = forms.CharField(max_length=200, required=False, help_text="For example the rack or ticket")
