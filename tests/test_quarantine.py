"""What an agent holds back: the batches the portal refused for good, with their tokens, raise an alert on the node
until the agent has sent them again."""

import pytest

from portal.alerts.models import Alert
from tests.factories import PASSWORD, OperatorFactory, batch_payload, engine_payload, node_with_credential
from tests.test_ingest import post

pytestmark = pytest.mark.django_db


def test_a_quarantine_on_the_node_is_alerted_shown_and_resolved_when_sent_again(client):
    node, cred = node_with_credential()
    assert post(client, batch_payload(seq=3, engines=[engine_payload()], quarantined_batches=2,
                                      quarantined_tokens=18_250), cred).status_code == 200
    node.refresh_from_db()
    assert (node.quarantined_batches, node.quarantined_tokens) == (2, 18_250)
    alert = Alert.objects.get(kind="agent_quarantine")
    assert alert.title == f"2 batches quarantined on {node.hostname}" and alert.severity == "critical"
    assert "18,250 tokens" in alert.detail and "tokenmill-agent requeue --all" in alert.detail
    client.login(username=OperatorFactory().username, password=PASSWORD)
    page = client.get(f"/fleet/nodes/{node.pk}/").content.decode()
    assert 'data-testid="quarantine"' in page and "18,250 tokens" in page
    # requeued on the node: the next batch says the quarantine is empty
    assert post(client, batch_payload(seq=4, quarantined_batches=0, quarantined_tokens=0), cred).status_code == 200
    alert.refresh_from_db()
    assert alert.resolved_at is not None
    assert 'data-testid="quarantine"' not in client.get(f"/fleet/nodes/{node.pk}/").content.decode()
