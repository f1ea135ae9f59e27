from django import forms

from portal.params import PageField
from portal.tenants.models import Tenant


class AuditFilterForm(forms.Form):
    tenant = forms.ModelChoiceField(queryset=Tenant.objects.order_by("name"), required=False,
                                    empty_label="Any tenant")
    action = forms.CharField(max_length=64, required=False)
    actor = forms.CharField(max_length=150, required=False)
    page = PageField()
