from datetime import UTC, datetime

from django.core.serializers.json import DjangoJSONEncoder
from django.db import models

from portal.accounts.models import User
from portal.audit.models import AuditEntry
from portal.tenants.models import Tenant


def _plain(value):
    if isinstance(value, str | int | float | bool | type(None)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return DjangoJSONEncoder().default(value)


def _jsonable(value: dict | None) -> dict | None:
    """A before/after state as JSON values (dates, decimals, UUIDs as DjangoJSONEncoder writes them; nested
    dicts and lists kept)."""
    return None if value is None else _plain(value)


def snapshot(obj: models.Model, fields: list[str]) -> dict:
    """The named fields of an object, for an entry's before/after."""
    return _jsonable({name: getattr(obj, name) for name in fields})


def audit_login_lockout(*, scope: str, ident: str, failures: int, until: float, **_signal) -> AuditEntry:
    """Receiver of accounts.throttle.login_locked_out: log-ins for an account or an address were paused."""
    user = User.objects.filter(username__iexact=ident).first() if scope == "account" else None
    return audit_record(actor=None, action=f"login.lockout_{scope}", target=user or f"{scope} {ident}",
                        after={"failures": failures, "until": datetime.fromtimestamp(until, tz=UTC)})


def audit_record(*, actor: User | None, action: str, target: models.Model | str, tenant: Tenant | None = None,
                 before: dict | None = None, after: dict | None = None) -> AuditEntry:
    """Record an operator's or tenant admin's action. Call it inside the service's transaction, so an action that
    rolls back leaves no entry."""
    return AuditEntry.objects.create(
        actor=actor, actor_label=actor.get_username() if actor else "system", tenant=tenant, action=action,
        target=str(target)[:200], before=_jsonable(before), after=_jsonable(after),
    )
