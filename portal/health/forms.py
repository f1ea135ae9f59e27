from django import forms

from portal.health.catalog import Action
from portal.health.models import HealthRule


class RuleForm(forms.Form):
    action = forms.ChoiceField(choices=Action.choices)
    quiet_minutes = forms.IntegerField(min_value=1, max_value=7 * 24 * 60, label="Quiet minutes")
    note = forms.CharField(max_length=300, required=False)

    @classmethod
    def for_rule(cls, rule: HealthRule) -> "RuleForm":
        return cls(initial={"action": rule.action, "quiet_minutes": rule.quiet_minutes, "note": rule.note},
                   prefix=f"xid{rule.xid}")


class OverrideForm(forms.Form):
    reason = forms.CharField(max_length=300, label="Why it may be sold without passing its acceptance test")


class CordonForm(forms.Form):
    unit = forms.RegexField(regex=r"^(node|gpu:\d+|mig:\d+)$", max_length=32,
                            error_messages={"invalid": "Choose the node, a GPU or a MIG instance."})
    reason = forms.CharField(max_length=300)
