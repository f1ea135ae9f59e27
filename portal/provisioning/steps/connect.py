"""The first step of every job: log in to the node with the job's key, presenting exactly the pinned host key."""

import paramiko

from portal.provisioning import crypto, ssh
from portal.provisioning.attempt import Outcome, Runner, StepFailed
from portal.provisioning.models import KnownHost, SshCredential
from portal.provisioning.steps.registry import step


def credential_pkey(credential: SshCredential) -> paramiko.PKey:
    if credential.key_path:
        return ssh.load_pkey_file(credential.key_path)
    return ssh.load_pkey(crypto.decrypt(credential.private_key_encrypted))


@step("connect", "Connect (pinned host key)", needs_ssh=False)
def step_connect(r: Runner) -> Outcome:
    job = r.job
    known = KnownHost.objects.filter(host=job.host, port=job.port).first()
    if known is None:
        raise StepFailed(f"no host key is pinned for {job.host}:{job.port}: confirm its fingerprint first")
    if job.credential is None:
        raise StepFailed("the job has no SSH credential")
    r.conn = ssh.connect(host=job.host, port=job.port, username=job.username, pkey=credential_pkey(job.credential),
                         key_type=known.key_type, key_base64=known.key_base64, pinned_fingerprint=known.fingerprint)
    out = Outcome()
    out.ok(f"connected to {job.target} with key {job.credential.fingerprint} ({job.credential.name})")
    out.ok(f"host key {known.fingerprint} ({known.key_type}) matches the key pinned on "
           f"{known.added_at:%Y-%m-%d %H:%M} UTC ({known.get_source_display().lower()})")
    if job.username != "root":
        check = r.remote.run("sudo -n true", privileged=False)
        if not check.ok:
            raise StepFailed(f"{job.username} cannot run sudo without a password (needed to install as root)",
                             check.text())
        out.ok(f"{job.username} may use sudo without a password")
    return out
