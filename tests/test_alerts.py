"""Alerts: the operator's list and its actions, notification channels, and delivery by e-mail and webhook."""

import json
import socket
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from celery.exceptions import MaxRetriesExceededError

from portal.alerts.models import Alert, AlertDelivery, NotificationChannel
from portal.alerts.services import alert_deliver, alert_raise
from portal.alerts.tasks import MAX_RETRIES, deliver_alert
from portal.celery import app as celery_app
from portal.fleet.models import NodeStatus
from portal.fleet.services import node_mark_status
from portal.health.catalog import CATALOG
from tests.conftest import bad_parameters
from tests.factories import (
    PASSWORD,
    GpuFactory,
    MembershipFactory,
    NodeFactory,
    OperatorFactory,
    ViewerFactory,
    batch_payload,
    gpu_payload,
    gpu_uuid,
    node_with_credential,
)
from tests.test_ingest import post

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)


def raise_alert(*, key: str = "xid:79:1", kind: str = "xid", severity: str = "critical", node=None, gpu=None,
                title: str = "XID 79: GPU has fallen off the bus", at: datetime = T0) -> Alert:
    return alert_raise(key=key, kind=kind, severity=severity, title=title, at=at, detail="dmesg line",
                       node_id=node.pk if node else None, gpu_id=gpu.pk if gpu else None)


@pytest.fixture
def admin_client(client):
    OperatorFactory(username="olivia")
    client.login(username="olivia", password=PASSWORD)
    return client


@pytest.fixture
def viewer_client(client):
    ViewerFactory(username="victor")
    client.login(username="victor", password=PASSWORD)
    return client


def listed(response) -> list[int]:
    return [alert.pk for alert in response.context["page"]]


class TestAlertList:
    def test_it_shows_an_xid_alert_with_its_meaning_node_gpu_and_occurrences(self, admin_client):
        node = NodeFactory(hostname="iad1-h100-03")
        gpu = GpuFactory(node=node, uuid=gpu_uuid(), index=5, name="NVIDIA H100 80GB HBM3")
        raise_alert(key=f"xid:79:{gpu.pk}", node=node, gpu=gpu)
        raise_alert(key=f"xid:79:{gpu.pk}", node=node, gpu=gpu, at=T0 + timedelta(minutes=3))
        html = admin_client.get("/alerts/").content.decode()
        assert "XID 79: GPU has fallen off the bus" in html
        assert f"GPU has fallen off the bus. {CATALOG[79].note}" in html
        assert f'href="/fleet/nodes/{node.pk}/">iad1-h100-03</a>' in html
        assert "GPU 5</a>" in html
        assert '<td class="num">2</td>' in html
        assert "2026-11-20 08:00:00" in html and "2026-11-20 08:03:00" in html

    def test_it_filters_by_state_severity_and_kind(self, admin_client):
        node = NodeFactory()
        xid = raise_alert(key="xid:79:1", node=node)
        ecc = raise_alert(key="ecc:1", kind="ecc_uncorrected", title="Uncorrected ECC error", node=node,
                          at=T0 + timedelta(minutes=1))
        hot = raise_alert(key="thermal:1", kind="thermal_throttle", severity="warning", title="Thermal throttling",
                          node=node, at=T0 + timedelta(minutes=2))
        offline = raise_alert(key="node_offline:1", kind="node_offline", title="offline", node=node,
                              at=T0 + timedelta(minutes=3))
        Alert.objects.filter(pk=ecc.pk).update(acknowledged_at=T0)
        Alert.objects.filter(pk=offline.pk).update(resolved_at=T0)

        assert listed(admin_client.get("/alerts/")) == [hot.pk, xid.pk]  # open by default, newest first
        assert listed(admin_client.get("/alerts/?state=acknowledged")) == [ecc.pk]
        assert listed(admin_client.get("/alerts/?state=resolved")) == [offline.pk]
        assert listed(admin_client.get("/alerts/?state=all")) == [offline.pk, hot.pk, ecc.pk, xid.pk]
        assert listed(admin_client.get("/alerts/?state=all&severity=warning")) == [hot.pk]
        assert listed(admin_client.get("/alerts/?state=all&kind=ecc_uncorrected")) == [ecc.pk]
        assert listed(admin_client.get("/alerts/?state=open&severity=critical&kind=xid")) == [xid.pk]
        assert listed(admin_client.get(f"/alerts/?alert={offline.pk}")) == [offline.pk]  # a notification's link
        response = admin_client.get("/alerts/?severity=critical")
        assert response.context["counts"] == {"open": 1, "acknowledged": 1, "resolved": 1, "all": 3}

    def test_it_renders_only_the_table_for_htmx(self, admin_client):
        raise_alert(node=NodeFactory())
        response = admin_client.get("/alerts/?state=open", HTTP_HX_REQUEST="true")
        html = response.content.decode()
        assert html.lstrip().startswith('<div id="alerts-table"') and "<html" not in html

    @pytest.mark.parametrize(("query", "field"), [
        ("state=closed", "state"), ("severity=fatal", "severity"), ("kind=meteor", "kind"), ("page=0", "page"),
        ("alert=abc", "alert"),
    ])
    def test_it_400s_a_bad_filter_naming_the_field(self, admin_client, query, field):
        assert bad_parameters(admin_client.get(f"/alerts/?{query}")) == {field}


class TestAlertActions:
    def test_it_records_who_acknowledged_and_resolved_and_when(self, admin_client):
        alert = raise_alert(node=NodeFactory())
        response = admin_client.post(f"/alerts/{alert.pk}/acknowledge/", {"next": "/alerts/"}, HTTP_HX_REQUEST="true")
        assert response.status_code == 200
        html = response.content.decode()
        assert html.lstrip().startswith(f'<tr id="alert-{alert.pk}"')
        assert "Acknowledged by olivia" in html and ">Resolve</button>" in html and "Acknowledge</button>" not in html
        assert response["HX-Trigger"] == "alerts-changed"
        alert.refresh_from_db()
        assert alert.acknowledged_by.username == "olivia"
        assert alert.acknowledged_at > datetime.now(tz=UTC) - timedelta(minutes=1)
        assert alert.resolved_at is None

        html = admin_client.post(f"/alerts/{alert.pk}/resolve/", HTTP_HX_REQUEST="true").content.decode()
        assert "Resolved by olivia" in html and "Acknowledged by olivia" in html and "<form" not in html
        alert.refresh_from_db()
        assert alert.resolved_by.username == "olivia"
        assert alert.resolved_at >= alert.acknowledged_at

    def test_it_keeps_the_first_acknowledgement(self, admin_client):
        alert = raise_alert(node=NodeFactory())
        first = OperatorFactory(username="ada")
        Alert.objects.filter(pk=alert.pk).update(acknowledged_at=T0, acknowledged_by=first)
        admin_client.post(f"/alerts/{alert.pk}/acknowledge/", HTTP_HX_REQUEST="true")
        alert.refresh_from_db()
        assert (alert.acknowledged_by, alert.acknowledged_at) == (first, T0)

    def test_it_redirects_a_plain_post_back_to_the_list_it_came_from(self, admin_client):
        alert = raise_alert(node=NodeFactory())
        response = admin_client.post(f"/alerts/{alert.pk}/acknowledge/", {"next": "/alerts/?severity=critical"})
        assert response.status_code == 302 and response["Location"] == "/alerts/?severity=critical"
        response = admin_client.post(f"/alerts/{alert.pk}/resolve/", {"next": "https://evil.example/"})
        assert response["Location"] == "/alerts/"
        alert.refresh_from_db()
        assert alert.resolved_by.username == "olivia"

    def test_it_refuses_viewers_the_actions_but_shows_them_the_list(self, viewer_client):
        alert = raise_alert(node=NodeFactory())
        html = viewer_client.get("/alerts/").content.decode()
        assert alert.title in html and "Acknowledge</button>" not in html
        assert viewer_client.post(f"/alerts/{alert.pk}/acknowledge/").status_code == 403
        assert viewer_client.post(f"/alerts/{alert.pk}/resolve/").status_code == 403
        alert.refresh_from_db()
        assert alert.acknowledged_at is None and alert.resolved_at is None

    def test_it_409s_acknowledging_a_resolved_alert_and_404s_an_unknown_one(self, admin_client):
        alert = raise_alert(node=NodeFactory())
        Alert.objects.filter(pk=alert.pk).update(resolved_at=T0)
        response = admin_client.post(f"/alerts/{alert.pk}/acknowledge/", HTTP_HX_REQUEST="true")
        assert response.status_code == 409 and "already resolved" in response.content.decode()
        assert admin_client.post("/alerts/999999/resolve/").status_code == 404
        assert admin_client.get(f"/alerts/{alert.pk}/resolve/").status_code == 405

    def test_it_opens_a_new_alert_when_a_resolved_cause_repeats(self):
        node = NodeFactory()
        first = raise_alert(node=node)
        Alert.objects.filter(pk=first.pk).update(resolved_at=T0)
        second = raise_alert(node=node, at=T0 + timedelta(hours=1))
        assert second.pk != first.pk and second.occurrences == 1


class TestChannels:
    def test_it_creates_enables_disables_and_deletes_a_channel(self, admin_client):
        response = admin_client.post("/alerts/channels/", {
            "name": "On-call", "kind": "webhook", "target": "https://hooks.example.com/T0/abc",
            "min_severity": "warning", "enabled": "on"})
        assert response.status_code == 302
        channel = NotificationChannel.objects.get()
        assert (channel.name, channel.kind, channel.target, channel.min_severity, channel.enabled) == (
            "On-call", "webhook", "https://hooks.example.com/T0/abc", "warning", True)
        assert channel.created_by.username == "olivia"
        assert "https://hooks.example.com/T0/abc" in admin_client.get("/alerts/channels/").content.decode()

        assert admin_client.post(f"/alerts/channels/{channel.pk}/enable/", {"enabled": "0"}).status_code == 302
        channel.refresh_from_db()
        assert channel.enabled is False
        admin_client.post(f"/alerts/channels/{channel.pk}/enable/", {"enabled": "1"})
        channel.refresh_from_db()
        assert channel.enabled is True
        response = admin_client.post(f"/alerts/channels/{channel.pk}/enable/", {"enabled": "maybe"})
        assert bad_parameters(response) == {"enabled"}

        assert admin_client.post(f"/alerts/channels/{channel.pk}/delete/").status_code == 302
        assert not NotificationChannel.objects.exists()
        assert admin_client.post(f"/alerts/channels/{channel.pk}/delete/").status_code == 404

    @pytest.mark.parametrize(("data", "field", "message"), [
        ({"kind": "email", "target": "not-an-address"}, "target", "Enter a valid e-mail address."),
        ({"kind": "webhook", "target": "ftp://example.com/hook"}, "target", "Enter a valid http:// or https:// URL."),
        ({"kind": "webhook", "target": "hooks.example.com"}, "target", "Enter a valid http:// or https:// URL."),
        ({"kind": "pager"}, "kind", "Select a valid choice."),
        ({"min_severity": "apocalyptic"}, "min_severity", "Select a valid choice."),
        ({"name": ""}, "name", "This field is required."),
        ({"name": "Existing"}, "name", "already exists"),
    ])
    def test_it_rejects_bad_channel_input_naming_the_field(self, admin_client, data, field, message):
        NotificationChannel.objects.create(name="Existing", kind="email", target="a@example.com")
        body = {"name": "Ops", "kind": "email", "target": "ops@example.com", "min_severity": "critical", **data}
        response = admin_client.post("/alerts/channels/", body)
        assert response.status_code == 400
        errors = response.context["form"].errors
        assert list(errors) == [field] and message in errors[field][0]
        assert message in response.content.decode().replace("&#x27;", "'")
        assert NotificationChannel.objects.count() == 1

    def test_it_keeps_channels_from_viewers(self, viewer_client):
        channel = NotificationChannel.objects.create(name="Ops", kind="email", target="ops@example.com")
        assert viewer_client.get("/alerts/channels/").status_code == 403
        assert viewer_client.post("/alerts/channels/", {"name": "x", "kind": "email", "target": "x@example.com",
                                                        "min_severity": "info"}).status_code == 403
        assert viewer_client.post(f"/alerts/channels/{channel.pk}/delete/").status_code == 403
        assert NotificationChannel.objects.count() == 1


class WebhookServer:
    """A real HTTP server on the loopback interface that answers with the queued status codes (then 200)."""

    def __init__(self):
        self.requests: list[dict] = []
        self.statuses: list[int] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers["Content-Length"])
                outer.requests.append({"path": self.path, "headers": dict(self.headers),
                                       "body": json.loads(self.rfile.read(length))})
                status = outer.statuses.pop(0) if outer.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/tokenmill"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook():
    with WebhookServer() as server:
        yield server


@pytest.fixture
def eager_retries():
    """Celery runs an eager task's retries in place (ignoring the countdown) only when eager errors do not
    propagate; the result then carries the outcome."""
    celery_app.conf.task_eager_propagates = False
    yield
    celery_app.conf.task_eager_propagates = True


def closed_port() -> int:
    """A loopback port nobody listens on: bound, read, released."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TestNotifications:
    def test_it_queues_deliveries_after_commit_for_a_new_alert_only(self, django_capture_on_commit_callbacks):
        critical = NotificationChannel.objects.create(name="Pager", kind="webhook", target="http://127.0.0.1:9/",
                                                      min_severity="critical")
        everything = NotificationChannel.objects.create(name="Log", kind="email", target="log@example.com",
                                                        min_severity="info")
        NotificationChannel.objects.create(name="Off", kind="email", target="off@example.com", min_severity="info",
                                           enabled=False)
        node = NodeFactory()
        with django_capture_on_commit_callbacks() as callbacks:
            warning = raise_alert(key="thermal:1", kind="thermal_throttle", severity="warning", node=node)
        assert len(callbacks) == 1
        assert list(AlertDelivery.objects.values_list("channel", "status")) == [(everything.pk, "pending")]
        with django_capture_on_commit_callbacks() as callbacks:
            raise_alert(key="thermal:1", kind="thermal_throttle", severity="warning", node=node)
            crit = raise_alert(key="xid:79:1", node=node)
            raise_alert(key="xid:79:1", node=node)
        assert len(callbacks) == 2  # the critical alert's two channels; the repeats queue nothing
        assert sorted(AlertDelivery.objects.filter(alert=crit).values_list("channel", flat=True)) == sorted(
            [critical.pk, everything.pk])
        assert Alert.objects.get(pk=warning.pk).occurrences == 2

    def test_it_emails_a_new_offline_alert(self, django_capture_on_commit_callbacks, mailoutbox):
        NotificationChannel.objects.create(name="Ops", kind="email", target="ops@example.com", min_severity="critical")
        node = NodeFactory(hostname="iad1-h100-07")
        with django_capture_on_commit_callbacks(execute=True):
            node_mark_status(node=node, status=NodeStatus.OFFLINE, at=T0, reason="no batch for 30 s")
        assert len(mailoutbox) == 1
        message = mailoutbox[0]
        alert = Alert.objects.get()
        assert message.to == ["ops@example.com"]
        assert message.subject == "[Tokenmill] CRITICAL: iad1-h100-07 is offline"
        assert "Node: iad1-h100-07" in message.body
        assert "Kind: Node offline" in message.body
        assert "Opened (UTC): 2026-11-20 08:00:00" in message.body
        assert "Detail: no batch for 30 s" in message.body
        assert f"/alerts/?alert={alert.pk}" in message.body
        delivery = AlertDelivery.objects.get()
        assert (delivery.status, delivery.attempts, delivery.error) == ("sent", 1, "")
        # Offline detection running again counts an occurrence and sends nothing more.
        with django_capture_on_commit_callbacks(execute=True):
            node_mark_status(node=node, status=NodeStatus.OFFLINE, at=T0 + timedelta(seconds=15), reason="again")
        assert len(mailoutbox) == 1

    def test_it_posts_an_ingested_xid_to_a_webhook(self, client, webhook, django_capture_on_commit_callbacks):
        NotificationChannel.objects.create(name="Hook", kind="webhook", target=webhook.url, min_severity="warning")
        _node, cred = node_with_credential(hostname="gpu-node")
        uuid = gpu_uuid()
        now = time.time()

        def batch(seq: int) -> dict:
            body = batch_payload(seq=seq, end=now + seq, gpus=[gpu_payload(uuid=uuid, index=2)])
            body["events"] = [{"ts": now + seq - 1, "gpu_uuid": uuid, "kind": "xid", "code": 79,
                               "detail": "GPU has fallen off the bus"}]
            return body

        with django_capture_on_commit_callbacks(execute=True):
            assert post(client, batch(1), cred).status_code == 200
        with django_capture_on_commit_callbacks(execute=True):
            assert post(client, batch(2), cred).status_code == 200  # the same XID again: one more occurrence
        alert = Alert.objects.get()
        assert alert.occurrences == 2
        assert len(webhook.requests) == 1
        request = webhook.requests[0]
        assert request["path"] == "/hooks/tokenmill"
        assert request["headers"]["Content-Type"] == "application/json"
        assert request["body"] == {
            "alert_id": alert.pk, "title": "XID 79: GPU has fallen off the bus on gpu-node", "severity": "critical",
            "kind": "xid", "node": "gpu-node", "gpu_index": 2, "opened_at": alert.opened_at.isoformat(),
            "detail": "GPU has fallen off the bus", "url": f"/alerts/?alert={alert.pk}",
        }
        assert AlertDelivery.objects.get().status == "sent"

    def test_it_records_a_failed_webhook_then_sends_on_retry_and_never_twice(self, webhook):
        channel = NotificationChannel.objects.create(name="Hook", kind="webhook", target=webhook.url,
                                                     min_severity="info")
        alert = raise_alert(node=NodeFactory())
        webhook.statuses = [500]
        delivery = alert_deliver(alert_id=alert.pk, channel_id=channel.pk)
        assert (delivery.status, delivery.attempts, delivery.error) == ("failed", 1, "HTTP 500 Internal Server Error")
        delivery = alert_deliver(alert_id=alert.pk, channel_id=channel.pk)
        assert (delivery.status, delivery.attempts, delivery.error) == ("sent", 2, "")
        delivery = alert_deliver(alert_id=alert.pk, channel_id=channel.pk)
        assert (delivery.status, delivery.attempts) == ("sent", 2)
        deliver_alert.delay(alert.pk, channel.pk)
        assert len(webhook.requests) == 2
        assert AlertDelivery.objects.count() == 1

    def test_it_retries_a_failing_webhook_in_the_task(self, webhook, eager_retries):
        channel = NotificationChannel.objects.create(name="Hook", kind="webhook", target=webhook.url,
                                                     min_severity="info")
        alert = raise_alert(node=NodeFactory())
        webhook.statuses = [500, 502]
        assert deliver_alert.delay(alert.pk, channel.pk).get() == "sent"
        delivery = AlertDelivery.objects.get()
        assert (delivery.status, delivery.attempts) == ("sent", 3)
        assert len(webhook.requests) == 3
        assert all(r["body"]["alert_id"] == alert.pk for r in webhook.requests)

    def test_it_gives_up_after_bounded_retries_on_a_refused_connection(self, eager_retries):
        channel = NotificationChannel.objects.create(name="Hook", kind="webhook", min_severity="info",
                                                     target=f"http://127.0.0.1:{closed_port()}/hook")
        alert = raise_alert(node=NodeFactory())
        with pytest.raises(MaxRetriesExceededError):
            deliver_alert.delay(alert.pk, channel.pk).get()
        delivery = AlertDelivery.objects.get()
        assert delivery.status == "failed" and delivery.attempts == MAX_RETRIES + 1
        assert "Connection refused" in delivery.error

    def test_it_skips_a_channel_disabled_or_deleted_before_delivery(self, mailoutbox):
        channel = NotificationChannel.objects.create(name="Ops", kind="email", target="ops@example.com",
                                                     enabled=False)
        alert = raise_alert(node=NodeFactory())
        assert deliver_alert.delay(alert.pk, channel.pk).get() is None
        assert deliver_alert.delay(alert.pk, 999999).get() is None
        assert mailoutbox == [] and not AlertDelivery.objects.exists()

    def test_it_takes_over_a_delivery_whose_worker_died_mid_send(self, mailoutbox):
        channel = NotificationChannel.objects.create(name="Ops", kind="email", target="ops@example.com",
                                                     min_severity="info")
        alert = raise_alert(node=NodeFactory())
        started = datetime.now(tz=UTC)
        AlertDelivery.objects.filter(alert=alert, channel=channel).update(status="sending", attempts=1, at=started)
        assert alert_deliver(alert_id=alert.pk, channel_id=channel.pk).status == "sending"  # another worker's
        assert mailoutbox == []
        AlertDelivery.objects.update(at=started - timedelta(minutes=5))
        assert alert_deliver(alert_id=alert.pk, channel_id=channel.pk).status == "sent"
        assert len(mailoutbox) == 1


MY_PAGES = ["/alerts/", "/alerts/channels/", "/standards/", "/standards/drift/"]


@pytest.mark.parametrize("page", MY_PAGES)
def test_it_keeps_tenant_users_and_anonymous_visitors_out(client, page):
    response = client.get(page)
    assert response.status_code == 302 and response["Location"] == f"/accounts/login/?next={page}"
    client.login(username=MembershipFactory().user.username, password=PASSWORD)
    assert client.get(page).status_code == 403


@pytest.mark.django_db
def test_it_requeues_deliveries_left_pending_when_the_broker_was_down(settings):
    from django.core import mail
    from django.utils import timezone

    from portal.alerts.tasks import requeue_stale_deliveries

    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    NotificationChannel.objects.create(name="ops", kind="email", target="ops@example.com", min_severity="warning")
    alert = alert_raise(key="k", kind="xid", severity="critical", title="XID 79", at=timezone.now())
    AlertDelivery.objects.filter(alert=alert).update(at=timezone.now() - timedelta(minutes=10))  # its task was lost
    assert requeue_stale_deliveries() == 1
    assert AlertDelivery.objects.get(alert=alert).status == AlertDelivery.Status.SENT
    assert len(mail.outbox) == 1
    assert requeue_stale_deliveries() == 0
