import re

import pytest
from django.core import mail

from portal.audit.models import AuditEntry
from tests.factories import PASSWORD, OperatorFactory, UserFactory

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
    assert "Please enter a correct username and password" in response.content.decode()
    assert "E-mail or username" in response.content.decode()


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


class TestLoginThrottle:
    def _login(self, client, username, password, address="203.0.113.7"):
        return client.post("/accounts/login/", {"username": username, "password": password}, REMOTE_ADDR=address)

    def test_it_pauses_an_account_after_its_failures_even_for_the_right_password(self, client, settings):
        settings.LOGIN_FAILURES_PER_ACCOUNT = 5
        OperatorFactory(username="ops")
        for n in range(4):
            assert "correct username and password" in self._login(client, "ops", f"wrong-{n}").content.decode()
        locked = self._login(client, "ops", "wrong-4").content.decode()
        assert "Too many failed log-ins for this account" in locked and "15 minutes" in locked
        # From another address, with the right password: still refused while the pause lasts.
        response = self._login(client, "OPS", PASSWORD, address="198.51.100.1")
        assert response.status_code == 200 and "Too many failed log-ins for this account" in response.content.decode()
        assert "_auth_user_id" not in client.session
        entry = AuditEntry.objects.get(action="login.lockout_account")
        assert entry.target == "ops" and entry.actor is None and entry.after["failures"] == 5

    def test_it_pauses_an_address_that_tries_many_accounts(self, client, settings):
        settings.LOGIN_FAILURES_PER_ADDRESS = 6
        OperatorFactory(username="victim")
        for n in range(6):
            self._login(client, f"guess-{n}", "wrong")
        response = self._login(client, "victim", PASSWORD)
        assert "Too many failed log-ins for your address" in response.content.decode()
        assert "_auth_user_id" not in client.session
        assert AuditEntry.objects.get(action="login.lockout_address").target == "address 203.0.113.7"
        assert self._login(client, "victim", PASSWORD, address="198.51.100.1").status_code == 302

    def test_a_success_clears_the_accounts_failures(self, client, settings):
        settings.LOGIN_FAILURES_PER_ACCOUNT = 3
        OperatorFactory(username="ops")
        for _ in range(2):
            self._login(client, "ops", "wrong")
        assert self._login(client, "ops", PASSWORD).status_code == 302
        client.logout()
        for _ in range(2):
            self._login(client, "ops", "wrong")
        assert self._login(client, "ops", PASSWORD).status_code == 302
        assert not AuditEntry.objects.exists()


class TestPasswordResetGivesNothingAway:
    def test_it_answers_known_and_unknown_addresses_alike_and_says_so_by_mail(self, client, settings):
        settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
        OperatorFactory(email="ops@example.com")
        UserFactory(email="new@example.com", is_active=False)
        answers = [client.post("/accounts/password-reset/", {"email": email})
                   for email in ("ops@example.com", "nobody@example.com", "new@example.com")]
        assert {(a.status_code, a["Location"]) for a in answers} == {(302, "/accounts/password-reset/sent/")}
        reset, unknown, inactive = mail.outbox
        assert "/accounts/reset/" in reset.body
        assert unknown.to == ["nobody@example.com"] and "No Tokenmill account uses this address" in unknown.body
        assert "/signup/" in unknown.body and "/accounts/reset/" not in unknown.body
        assert inactive.to == ["new@example.com"] and "not active yet" in inactive.body

    def test_it_sends_one_address_a_few_mails_an_hour_at_most(self, client, settings):
        settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
        for _ in range(8):
            assert client.post("/accounts/password-reset/", {"email": "target@example.com"}).status_code == 302
        assert len(mail.outbox) == 5
