"""Provisioning's write actions: SSH credentials and pinned host keys (credentials), the jobs that install the
agent, test a node before sale or take it out (jobs), and running them (runner). The steps live in one registry
(portal.provisioning.steps)."""

from portal.provisioning.services.credentials import (
    ProvisioningError,
    credential_create_path,
    credential_create_upload,
    known_host_pin,
    known_host_remove,
)
from portal.provisioning.services.jobs import (
    burn_in_create,
    decommission_create,
    host_key_confirm,
    host_key_fetch,
    host_key_reject,
    job_cancel,
    job_retry,
    jobs_create,
    last_install,
)
from portal.provisioning.services.runner import job_run

__all__ = [
    "ProvisioningError", "burn_in_create", "credential_create_path", "credential_create_upload",
    "decommission_create", "host_key_confirm", "host_key_fetch", "host_key_reject", "job_cancel", "job_retry",
    "job_run", "jobs_create", "known_host_pin", "known_host_remove", "last_install",
]
