"""Where an action posted from one of our pages returns when it is done."""

from django.http import HttpRequest
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme


def next_url(request: HttpRequest, default: str) -> str:
    """The page the form came from (its `next` field) when that page is on this site, else the URL named `default`:
    a posted `next` is the user's input, and a link to another site would make us an open redirect."""
    url = request.POST.get("next", "")
    if url_has_allowed_host_and_scheme(url, allowed_hosts={request.get_host()}, require_https=request.is_secure()):
        return url
    return reverse(default)
