"""One attempt of a provisioning job: its SSH connection, the wheels it uploads, and what each step reports."""

import shlex
from dataclasses import dataclass, field

from django.utils import timezone

from portal.provisioning import ssh
from portal.provisioning.models import JobStatus, ProvisioningJob
from portal.provisioning.wheels import WheelSet, ensure_wheels

SYSTEMD_STATE_DIR = "/var/lib/tokenmill-agent"


class StepFailed(Exception):
    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message)
        self.output = output


class Cancelled(Exception):
    pass


@dataclass
class Outcome:
    lines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def ok(self, line: str) -> None:
        self.lines.append(line)

    def warn(self, line: str) -> None:
        self.warnings.append(line)
        self.lines.append(f"warning: {line}")

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


class Runner:
    """The state of one attempt: the job, the SSH connection (opened by the connect step), the wheels."""

    def __init__(self, job: ProvisioningJob) -> None:
        self.job = job
        self.conn: ssh.Connection | None = None
        self._wheels: WheelSet | None = None

    @property
    def remote(self) -> ssh.Connection:
        if self.conn is None:
            raise StepFailed("no SSH connection (the connect step did not run)")
        return self.conn

    @property
    def dir(self) -> str:
        return self.job.install_dir.rstrip("/")

    @property
    def q_dir(self) -> str:
        return shlex.quote(self.dir)

    @property
    def state_dir(self) -> str:
        return SYSTEMD_STATE_DIR if self.job.init_system == "systemd" else f"{self.dir}/state"

    def run(self, command: str, what: str, *, timeout: float = ssh.COMMAND_TIMEOUT_S) -> ssh.Result:
        result = self.remote.run(command, timeout=timeout)
        if not result.ok:
            raise StepFailed(f"{what} failed (exit status {result.exit_status})", result.text())
        return result

    def put_file(self, remote: str, data: bytes, *, mode: int) -> None:
        """Write a file on the node; through a private staging file and `install` when not logged in as root."""
        if self.remote.username == "root":
            self.remote.write(remote, data, mode=mode)
            return
        staging = self.remote.run("mktemp /tmp/tokenmill.XXXXXXXX", privileged=False).stdout.strip()
        self.remote.write(staging, data, mode=0o600)
        self.run(f"install -m {mode:o} {shlex.quote(staging)} {shlex.quote(remote)}", f"installing {remote}")
        self.remote.run(f"rm -f {shlex.quote(staging)}", privileged=False)

    def wheels(self) -> WheelSet:
        if self._wheels is None:
            self._wheels = ensure_wheels()
        return self._wheels

    def heartbeat(self) -> None:
        ProvisioningJob.objects.filter(pk=self.job.pk).update(heartbeat_at=timezone.now())

    def check_cancelled(self) -> None:
        if ProvisioningJob.objects.filter(pk=self.job.pk, status=JobStatus.CANCELLED).exists():
            raise Cancelled

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
