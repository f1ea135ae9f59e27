from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import connection, transaction
from django.db.models import F, Max
from django.utils import timezone

from portal.accounts.models import User
from portal.alerts.models import Severity
from portal.alerts.services import alert_raise, alert_resolve_key
from portal.fleet.models import (
    EnrollmentToken,
    Gpu,
    HealthEvent,
    HealthEventKind,
    Node,
    NodeCredential,
    NodeLifecycle,
    NodeLifecycleChange,
    NodeStatus,
    NodeStatusChange,
    ScrapeTarget,
    Site,
)
from portal.keys import issue_key, key_matches, key_prefix
from portal.partial import partial_instance

ENROLL_KIND = "tme"
CREDENTIAL_KIND = "tmn"
OFFLINE_AFTER_INTERVALS = 3


class EnrollmentError(Exception):
    """The enrollment token is unknown, used or expired (the message is safe to show the agent)."""


@dataclass(frozen=True)
class Enrolled:
    node: Node
    credential: str


def enrollment_token_create(
    *, site: Site, created_by: User | None, ttl: timedelta = timedelta(hours=24), note: str = ""
) -> tuple[EnrollmentToken, str]:
    """Create a one-time token; the plaintext is returned once and never stored."""
    key = issue_key(kind=ENROLL_KIND)
    token = EnrollmentToken.objects.create(
        site=site, prefix=key.prefix, digest=key.digest, created_by=created_by,
        expires_at=timezone.now() + ttl, note=note,
    )
    return token, key.value


def enrollment_token_revoke(*, token_id: int, now: datetime | None = None) -> bool:
    """Expire an unused enrollment token at once (node_enroll refuses it from then on). False when it was used."""
    return bool(EnrollmentToken.objects.filter(pk=token_id, used_at__isnull=True).update(
        expires_at=now or timezone.now()))


def node_enroll(*, token_value: str, host: dict, now: datetime | None = None) -> Enrolled:
    """Trade a one-time enrollment token for a node credential. Re-enrolling a hostname keeps the node's history
    and revokes its previous credentials."""
    now = now or timezone.now()
    prefix = key_prefix(token_value, kind=ENROLL_KIND)
    if prefix is None:
        raise EnrollmentError("enrollment token is malformed")
    with transaction.atomic():
        token = EnrollmentToken.objects.select_for_update().filter(prefix=prefix).select_related("site").first()
        if token is None or not key_matches(token_value, token.digest):
            raise EnrollmentError("enrollment token is not valid")
        if token.used_at is not None:
            raise EnrollmentError("enrollment token was already used")
        if token.expires_at <= now:
            raise EnrollmentError("enrollment token has expired")
        node, created = Node.objects.get_or_create(site=token.site, hostname=host["hostname"],
                                                   defaults={"installed_at": now})
        if node.status == NodeStatus.DECOMMISSIONED:
            # Retired for the books: its past cost stays where it was. The machine comes back as a new node.
            raise EnrollmentError(f"{node.hostname} was decommissioned; enroll the machine under a new hostname")
        if not created and not NodeCredential.objects.filter(node=node).exists():
            # A node planned (or put in provisioning) before it ever enrolled: on the books from now.
            node.installed_at = now
        if node.lifecycle in (NodeLifecycle.PLANNED, NodeLifecycle.PROVISIONING):
            node_lifecycle_set(node=node, lifecycle=NodeLifecycle.BURN_IN, at=now,
                               reason="enrolled: the acceptance test decides when it is sellable")
        _apply_host_facts(node, host)
        if not created:
            NodeCredential.objects.filter(node=node, revoked_at__isnull=True).update(revoked_at=now)
        node.save()
        key = issue_key(kind=CREDENTIAL_KIND)
        NodeCredential.objects.create(node=node, prefix=key.prefix, digest=key.digest)
        token.used_at = now
        token.node = node
        token.save(update_fields=["used_at", "node"])
    return Enrolled(node=node, credential=key.value)


def _apply_host_facts(node: Node, host: dict) -> list[str]:
    """Copy reported host facts onto the node; returns the names of fields that changed."""
    changed = []
    for field in ("os", "kernel", "driver_version", "cuda_driver_version", "nvml_version", "agent_version"):
        value = host.get(field) or ""
        if getattr(node, field) != value:
            setattr(node, field, value)
            changed.append(field)
    simulated = bool(host.get("simulated"))
    if node.simulated != simulated:
        node.simulated = simulated
        changed.append("simulated")
    return changed


_NODE_FIELDS = ("last_seen", "config_version", "interval_s", "sample_s")  # what an ingest request reads


def credential_authenticate(*, value: str) -> NodeCredential | None:
    """The live credential matching a presented bearer value, with its node; None otherwise. Every agent request
    asks, so it is one indexed query in plain SQL: the node's fields an ingest request reads come with it, any
    other loads when read."""
    prefix = key_prefix(value, kind=CREDENTIAL_KIND)
    if prefix is None:
        return None
    quote = connection.ops.quote_name
    # Names come from the models' metadata and are quoted; the prefix is a bound parameter.
    statement = (f"SELECT c.id, c.digest, n.id, {', '.join(f'n.{quote(name)}' for name in _NODE_FIELDS)} "  # noqa: S608
                 f"FROM {quote(NodeCredential._meta.db_table)} c JOIN {quote(Node._meta.db_table)} n "
                 "ON n.id = c.node_id WHERE c.prefix = %s AND c.revoked_at IS NULL")
    with connection.cursor() as cursor:
        cursor.execute(statement, [prefix])
        row = cursor.fetchone()
    if row is None or not key_matches(value, row[1]):
        return None
    credential = partial_instance(NodeCredential, {"id": row[0], "digest": row[1], "node_id": row[2]})
    credential.node = partial_instance(Node, {"id": row[2], **dict(zip(_NODE_FIELDS, row[3:], strict=True))})
    return credential


def credential_revoke(*, node: Node) -> int:
    return NodeCredential.objects.filter(node=node, revoked_at__isnull=True).update(revoked_at=timezone.now())


def node_credential_issue(*, node: Node) -> str:
    """Issue a fresh credential for an existing node (demo seeding, provisioning); revokes none."""
    key = issue_key(kind=CREDENTIAL_KIND)
    NodeCredential.objects.create(node=node, prefix=key.prefix, digest=key.digest)
    return key.value


def node_set_scrape_targets(*, node: Node, targets: list[dict]) -> None:
    """Replace the node's scrape targets and bump its config version, so its agent picks them up."""
    with transaction.atomic():
        ScrapeTarget.objects.filter(node=node).delete()
        ScrapeTarget.objects.bulk_create(
            ScrapeTarget(node=node, url=t["url"], engine=t["engine"], model=t.get("model") or "") for t in targets
        )
        Node.objects.filter(pk=node.pk).update(config_version=F("config_version") + 1)
    node.refresh_from_db(fields=["config_version"])


def node_mark_status(*, node: Node, status: str, at: datetime, reason: str) -> None:
    """Record a status change with its event and alert (offline opens one, online resolves it)."""
    Node.objects.filter(pk=node.pk).update(status=status)
    node.status = status
    if status == NodeStatus.DECOMMISSIONED:
        node_retire(node=node, at=at)
        node_lifecycle_set(node=node, lifecycle=NodeLifecycle.RETIRED, at=at, reason=reason)
    NodeStatusChange.objects.create(node=node, status=status, at=at, reason=reason)
    key = f"node_offline:{node.pk}"
    if status == NodeStatus.OFFLINE:
        HealthEvent.objects.create(node=node, kind=HealthEventKind.NODE_OFFLINE, at=at, detail=reason)
        alert_raise(
            key=key, kind=HealthEventKind.NODE_OFFLINE, severity=Severity.CRITICAL, at=at,
            title=f"{node.hostname} is offline", detail=reason, node_id=node.pk,
        )
    elif status == NodeStatus.ONLINE and alert_resolve_key(key=key):
        HealthEvent.objects.create(node=node, kind=HealthEventKind.NODE_ONLINE, at=at, detail=reason)


def node_lifecycle_set(*, node: Node, lifecycle: str, at: datetime, reason: str,
                       by: User | None = None) -> bool:
    """Move a node to another stage of its life, with the dated change its bring-up timeline shows. False (and
    nothing written) when it is already there."""
    if not Node.objects.filter(pk=node.pk).exclude(lifecycle=lifecycle).update(lifecycle=lifecycle):
        return False
    node.lifecycle = lifecycle
    NodeLifecycleChange.objects.create(node=node, lifecycle=lifecycle, at=at, reason=reason[:300], by=by)
    return True


def nodes_plan(*, site: Site, hostnames: list[str], gpu_model: str, gpus: int, at: datetime,
               by: User | None) -> list[Node]:
    """Put named nodes of a bring-up plan on the site: no credential, no GPUs and nothing on the books until
    they enroll. A hostname the site already has is refused (its node has a life of its own)."""
    taken = set(Node.objects.filter(site=site, hostname__in=hostnames).values_list("hostname", flat=True))
    if taken:
        raise ValueError(f"{site} already has {', '.join(sorted(taken))}")
    nodes = []
    with transaction.atomic():
        for hostname in hostnames:
            nodes.append(node_expect(site=site, hostname=hostname, lifecycle=NodeLifecycle.PLANNED, at=at, by=by,
                                     reason=f"planned: {gpus} x {gpu_model}", planned_gpu_model=gpu_model,
                                     planned_gpus=gpus))
    return nodes


def node_expect(*, site: Site, hostname: str, lifecycle: str, at: datetime, reason: str, by: User | None,
                planned_gpu_model: str = "", planned_gpus: int | None = None) -> Node:
    """A node the portal knows of before it enrolls (planned, or being provisioned), with its first dated
    lifecycle change."""
    node = Node.objects.create(site=site, hostname=hostname, lifecycle=lifecycle, installed_at=at,
                               planned_gpu_model=planned_gpu_model, planned_gpus=planned_gpus)
    NodeLifecycleChange.objects.create(node=node, lifecycle=lifecycle, at=at, reason=reason[:300], by=by)
    return node


def node_retire(*, node: Node, at: datetime) -> None:
    """Take a node and its GPUs off the books from `at`: their rows stay, so the hours they were installed keep
    their cost whenever a period is re-attributed (economics.attribution counts only hours on the books)."""
    Node.objects.filter(pk=node.pk, retired_at__isnull=True).update(retired_at=at)
    Gpu.objects.filter(node=node, retired_at__isnull=True).update(retired_at=at)
    node.retired_at = node.retired_at or at


def nodes_detect_offline(*, now: datetime | None = None) -> list[int]:
    """Mark offline every online node that missed three of its intervals. Idempotent; returns the node ids."""
    from portal.telemetry.models import IngestedBatch

    now = now or timezone.now()
    online = list(Node.objects.filter(status=NodeStatus.ONLINE).only("id", "hostname", "interval_s", "status"))
    if not online:
        return []
    longest = max(node.interval_s for node in online) * OFFLINE_AFTER_INTERVALS
    last_batch = dict(
        IngestedBatch.objects.filter(received_at__gte=now - timedelta(seconds=longest))
        .values_list("node_id")
        .annotate(last=Max("received_at"))
    )
    went_offline = []
    for node in online:
        window = OFFLINE_AFTER_INTERVALS * node.interval_s
        last = last_batch.get(node.pk)
        if last is None or last < now - timedelta(seconds=window):
            node_mark_status(
                node=node, status=NodeStatus.OFFLINE, at=now,
                reason=f"no batch for {OFFLINE_AFTER_INTERVALS} intervals ({window}s)",
            )
            went_offline.append(node.pk)
    return went_offline
