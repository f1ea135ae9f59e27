from datetime import UTC, datetime, time

from django import forms
from django.utils import timezone

from portal.params import DayField, PageField
from portal.tenants.models import MemberRole, Plan, TenantStatus
from portal.tenants.services import signup_organization_problem, signup_password_problems

MAX_TOKENS_PER_MONTH = 10**15


class SignupForm(forms.Form):
    organization = forms.CharField(max_length=120, label="Organization")
    admin_name = forms.CharField(max_length=150, label="Your name")
    email = forms.EmailField(label="Work e-mail", help_text="You log in with it; we send a link to verify it.")
    password = forms.CharField(widget=forms.PasswordInput(render_value=False), strip=False,
                               help_text="At least 10 characters, not a common or all-numeric password.")
    intended_models = forms.CharField(widget=forms.Textarea(attrs={"rows": 2}), max_length=2000,
                                      label="Models you intend to serve",
                                      help_text="For example meta-llama/Llama-3.1-70B-Instruct")
    expected_tokens_per_month = forms.IntegerField(min_value=0, max_value=MAX_TOKENS_PER_MONTH, required=False,
                                                   label="Expected volume (tokens per month)")
    requested_capacity = forms.CharField(widget=forms.Textarea(attrs={"rows": 2}), max_length=2000, required=False,
                                         label="Capacity you need",
                                         help_text="GPU type and count, e.g. 2 x NVIDIA H100 80GB, or 4 x MIG 3g.40gb")

    def clean_organization(self) -> str:
        name = self.cleaned_data["organization"].strip()
        problem = signup_organization_problem(organization=name)
        if problem:
            raise forms.ValidationError(problem)
        return name

    def clean_email(self) -> str:
        return self.cleaned_data["email"].strip().lower()

    def clean(self) -> dict:
        cleaned = super().clean()
        password = cleaned.get("password")
        if password:
            problems = signup_password_problems(password=password, email=cleaned.get("email", ""),
                                                admin_name=cleaned.get("admin_name", ""))
            for problem in problems:
                self.add_error("password", problem)
        return cleaned


class ResendVerificationForm(forms.Form):
    email = forms.EmailField(label="E-mail address you signed up with")


class AcceptInvitationForm(forms.Form):
    name = forms.CharField(max_length=150, label="Your name")
    password = forms.CharField(widget=forms.PasswordInput, strip=False,
                               help_text="At least 10 characters, not a common or all-numeric password.")

    def __init__(self, *args, email: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.email = email

    def clean(self) -> dict:
        cleaned = super().clean()
        if cleaned.get("password"):
            for problem in signup_password_problems(password=cleaned["password"], email=self.email,
                                                    admin_name=cleaned.get("name", "")):
                self.add_error("password", problem)
        return cleaned


# Operators --------------------------------------------------------------------------------------------------------


class TenantFilterForm(forms.Form):
    status = forms.ChoiceField(choices=[("", "Any status"), *TenantStatus.choices], required=False)
    page = PageField()


class ApproveForm(forms.Form):
    plan = forms.ModelChoiceField(queryset=Plan.objects.order_by("name"), empty_label="Choose a plan")


class ReasonForm(forms.Form):
    reason = forms.CharField(widget=forms.Textarea(attrs={"rows": 2}), max_length=1000,
                             help_text="Sent to the tenant's admins")


class PlanForm(forms.ModelForm):
    class Meta:
        model = Plan
        fields = ["name", "tokens_per_minute", "gpus", "description"]
        widgets = {"description": forms.Textarea(attrs={"rows": 2})}


# Tenant portal ----------------------------------------------------------------------------------------------------


class InviteForm(forms.Form):
    email = forms.EmailField()
    role = forms.ChoiceField(choices=MemberRole.choices, initial=MemberRole.MEMBER)


class RoleForm(forms.Form):
    role = forms.ChoiceField(choices=MemberRole.choices)


class ApiKeyForm(forms.Form):
    name = forms.CharField(max_length=80, help_text="What uses the key, e.g. billing-export")


class UsageRangeForm(forms.Form):
    days = forms.TypedChoiceField(choices=[(7, "7 days"), (30, "30 days"), (90, "90 days")], coerce=int,
                                  required=False, empty_value=30)


class CapacityRequestForm(forms.Form):
    model_name = forms.CharField(max_length=200, label="Model", help_text="e.g. meta-llama/Llama-3.1-8B-Instruct")
    gpu_type = forms.ChoiceField(label="GPU type")
    count = forms.IntegerField(min_value=1, max_value=256, initial=1,
                               help_text="Whole GPUs, or MIG instances when a profile is chosen")
    mig_profile = forms.ChoiceField(label="MIG profile", required=False)
    starts_on = DayField(label="From (UTC date)", widget=forms.DateInput(attrs={"type": "date"}))
    note = forms.CharField(widget=forms.Textarea(attrs={"rows": 2}), max_length=2000, required=False)

    def __init__(self, *args, gpu_types: list[str], mig_profiles: list[tuple[str, str]], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.mig_profiles = set(mig_profiles)
        self.fields["gpu_type"].choices = [(name, name) for name in gpu_types]
        profiles = sorted({profile for _, profile in mig_profiles})
        self.fields["mig_profile"].choices = [("", "Whole GPUs"), *[(p, p) for p in profiles]]

    def clean_starts_on(self):
        starts_on = self.cleaned_data["starts_on"]
        if starts_on < timezone.now().date():
            raise forms.ValidationError("The date is in the past.")
        return starts_on

    def clean(self) -> dict:
        cleaned = super().clean()
        gpu_type, profile = cleaned.get("gpu_type"), cleaned.get("mig_profile")
        if gpu_type and profile and (gpu_type, profile) not in self.mig_profiles:
            self.add_error("mig_profile", f"The fleet has no {profile} instances on {gpu_type}.")
        return cleaned

    def starts_at(self) -> datetime:
        """Midnight UTC of the chosen day, or now when it is today."""
        now = timezone.now().replace(second=0, microsecond=0)
        return max(now, datetime.combine(self.cleaned_data["starts_on"], time.min, tzinfo=UTC))
