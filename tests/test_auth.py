import re

import pytest
from django.core import mail

from tests.factories import PASSWORD, OperatorFactory

pytestmark = pytest.mark.django_db


def test_it_logs_in_and_out(client):
    user = OperatorFactory(username="ops")
    response = client.post("/accounts/login/", {"username": "ops", "password": PASSWORD}, follow=True)
    assert response.redirect_chain[-1][0] == "/fleet/"
    assert "ops · operator admin" in response.content.decode()
    assert client.post("/accounts/logout/").status_code == 302
    assert client.get("/fleet/").status_code == 302
    assert user.is_operator_admin


def test_it_rejects_a_wrong_password(client):
    OperatorFactory(username="ops")
    response = client.post("/accounts/login/", {"username": "ops", "password": "wrong"})
    assert response.status_code == 200
    assert "didn't match" in response.content.decode()


def test_it_resets_a_password_by_email(client, settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    user = OperatorFactory(username="ops", email="ops@example.com")
    client.post("/accounts/password-reset/", {"email": "ops@example.com"})
    assert len(mail.outbox) == 1
    link = re.search(r"http://testserver(/accounts/reset/\S+)", mail.outbox[0].body).group(1)
    form = client.get(link, follow=True)
    assert form.status_code == 200
    response = client.post(form.redirect_chain[-1][0], {"new_password1": "a-new-long-pass-42",
                                                         "new_password2": "a-new-long-pass-42"})
    assert response.status_code == 302
    user.refresh_from_db()
    assert user.check_password("a-new-long-pass-42")
