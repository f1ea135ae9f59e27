from django.apps import AppConfig


class AuditConfig(AppConfig):
    name = "portal.audit"
    label = "audit"

    def ready(self) -> None:
        from portal.accounts.throttle import login_locked_out
        from portal.audit.services import audit_login_lockout

        login_locked_out.connect(audit_login_lockout, dispatch_uid="audit_login_lockout")
