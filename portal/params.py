"""Query parameters of pages: each view declares a form for them; a value it cannot take answers 400 naming the
parameter (never a 500 from a date or an id beyond what the database or the calendar holds)."""

from datetime import date, datetime

from django import forms
from django.core.exceptions import BadRequest, ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

# Ids are 64-bit signed integers in every table; dates this project can mean lie in this century.
ID_MAX = 2**63 - 1
FIRST_DAY, LAST_DAY = date(2000, 1, 1), date(2100, 12, 31)


def IdField(**kwargs) -> forms.IntegerField:
    return forms.IntegerField(min_value=1, max_value=ID_MAX, **kwargs)


def PageField() -> forms.IntegerField:
    return forms.IntegerField(min_value=1, max_value=1_000_000, required=False)


def _in_calendar(value: date) -> None:
    if not FIRST_DAY <= value <= LAST_DAY:
        raise ValidationError(f"Enter a date from {FIRST_DAY:%Y-%m-%d} to {LAST_DAY:%Y-%m-%d}.")


def DayField(**kwargs) -> forms.DateField:
    return forms.DateField(validators=[_in_calendar], **kwargs)


def _moment_in_calendar(value: datetime) -> None:
    _in_calendar(value.date())


def MomentField(**kwargs) -> forms.DateTimeField:
    return forms.DateTimeField(validators=[_moment_in_calendar], **kwargs)


class BadParameter(BadRequest):
    """A query parameter the page cannot take; `problems` maps each parameter to what is wrong with it."""

    def __init__(self, problems: dict[str, str]) -> None:
        super().__init__("; ".join(f"{name}: {msg}" for name, msg in problems.items()))
        self.problems = problems


def query_params(request: HttpRequest, form_class: type[forms.Form], **kwargs) -> dict:
    """The request's query parameters, cleaned by the view's form; BadParameter when one is not acceptable."""
    return cleaned_params(request.GET, form_class, **kwargs)


def cleaned_params(data, form_class: type[forms.Form], **kwargs) -> dict:
    """`data` (query parameters or a small posted action) cleaned by the form; BadParameter naming what is not
    acceptable."""
    form = form_class(data, **kwargs)
    if not form.is_valid():
        raise BadParameter({name: " ".join(errors) for name, errors in form.errors.items()})
    return form.cleaned_data


class BadParameterMiddleware:
    """Renders BadParameter as the 400 page, naming each parameter, in the demo's DEBUG mode too."""

    def __init__(self, get_response) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if isinstance(exception, BadParameter):
            return render(request, "400.html", {"problems": exception.problems}, status=400)
        return None
