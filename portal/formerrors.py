"""A form's errors as one line for a message: each field named, as a 400 page must."""

from django import forms


def form_errors_text(form: forms.Form) -> str:
    return "; ".join(f"{name}: {' '.join(errors)}" if name != "__all__" else " ".join(errors)
                     for name, errors in form.errors.items())
