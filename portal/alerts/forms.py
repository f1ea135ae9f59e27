from django import forms
from django.core.exceptions import ValidationError
from django.core.validators import EmailValidator, URLValidator

from portal.alerts.models import ALERT_KINDS, AlertState, NotificationChannel, Severity
from portal.params import IdField, PageField

ALL = "all"


class AlertFilterForm(forms.Form):
    state = forms.ChoiceField(choices=[*AlertState.choices, (ALL, "All")], required=False)
    severity = forms.ChoiceField(choices=[("", "Any severity"), *Severity.choices], required=False)
    kind = forms.ChoiceField(choices=[("", "Any kind"), *ALERT_KINDS], required=False)
    alert = IdField(required=False)
    page = PageField()

    def clean_state(self) -> str | None:
        """No state asked: open alerts, unless one alert is asked for by id (a notification's link)."""
        state = self.cleaned_data["state"]
        if not state:
            return None if self.data.get("alert") else AlertState.OPEN
        return None if state == ALL else state


class NotificationChannelForm(forms.ModelForm):
    class Meta:
        model = NotificationChannel
        fields = ["name", "kind", "target", "min_severity", "enabled"]

    def clean(self) -> dict:
        cleaned = super().clean()
        kind, target = cleaned.get("kind"), cleaned.get("target")
        if kind and target:
            try:
                if kind == NotificationChannel.Kind.EMAIL:
                    EmailValidator(message="Enter a valid e-mail address.")(target)
                else:
                    URLValidator(schemes=["http", "https"], message="Enter a valid http:// or https:// URL.")(target)
            except ValidationError as exc:
                self.add_error("target", exc)
        return cleaned


class ChannelEnableForm(forms.Form):
    enabled = forms.TypedChoiceField(choices=[("1", "Enable"), ("0", "Disable")], coerce=lambda v: v == "1")
