"""Installing the agent on a node over SSH: preflight, upload, install, configure, enroll, start, and the wait for
its first batch. The node then goes to its acceptance test (steps.burnin)."""

import hashlib
import json
import shlex
import time
from datetime import timedelta
from pathlib import Path

from django.conf import settings

from portal.fleet.services import enrollment_token_create, enrollment_token_revoke
from portal.provisioning.attempt import Outcome, Runner, StepFailed
from portal.provisioning.models import ProvisioningJob
from portal.provisioning.parsing import (
    QUERY_GPU_FIELDS,
    parse_df_available_mib,
    parse_os_release,
    parse_python_version,
    parse_query_gpu_csv,
)
from portal.provisioning.steps.registry import step
from portal.standards.selectors import current_baseline
from portal.standards.versions import compare

MIN_FREE_MIB = 256
MIN_PYTHON = (3, 11)  # the agent reads its TOML with tomllib
CLOCK_WARN_S = 5.0
CLOCK_FAIL_S = 300.0  # the portal refuses batches stamped more than 5 minutes in the future
ENROLL_TOKEN_TTL = timedelta(hours=1)
FIRST_BATCH_TIMEOUT_S = 120.0
FIRST_BATCH_POLL_S = 1.0
UNIT_PATH = "/etc/systemd/system/tokenmill-agent.service"
# systemd's ProtectHome= and PrivateTmp= hide these from the hardened unit.
HIDDEN_FROM_UNIT = ("/home/", "/root/", "/tmp/", "/var/tmp/", "/run/user/")  # noqa: S108 -- paths refused, not used


def unused_token_expire(job: ProvisioningJob) -> None:
    """Revoke the job's enrollment token; a node never enrolled with it."""
    if job.enrollment_token_id:
        enrollment_token_revoke(token_id=job.enrollment_token_id)


@step("preflight", "Preflight checks", needs_ssh=True)
def step_preflight(r: Runner) -> Outcome:
    job, out = r.job, Outcome()
    facts: dict = {}
    uname = r.run("uname -sr", "uname").stdout.strip()
    if not uname.startswith("Linux"):
        raise StepFailed(f"the agent runs on Linux only, not {uname}")
    release = r.remote.run("cat /etc/os-release")
    facts["os"] = parse_os_release(release.stdout) if release.ok else "unknown"
    facts["kernel"] = uname
    out.ok(f"OS: {facts['os']} ({uname})")

    python = r.remote.run("python3 --version 2>&1")
    version = parse_python_version(python.stdout)
    if version is None:
        raise StepFailed("python3 is not installed (the agent needs Python 3.11 or newer)", python.text())
    facts["python"] = ".".join(map(str, version))
    if version[:2] < MIN_PYTHON:
        raise StepFailed(f"python3 is {facts['python']}; the agent needs 3.11 or newer")
    venv = r.remote.run("python3 -c 'import venv'")
    if not venv.ok:
        raise StepFailed("python3 has no venv module (install python3-venv)", venv.text())
    out.ok(f"Python {facts['python']} with venv")

    smi = r.remote.run(f"nvidia-smi --query-gpu={','.join(QUERY_GPU_FIELDS)} --format=csv", timeout=60)
    gpus = []
    if smi.ok:
        try:
            gpus = parse_query_gpu_csv(smi.stdout)
        except ValueError as exc:
            raise StepFailed(f"cannot read nvidia-smi's output: {exc}", smi.text()) from None
    elif job.simulate_gpus:
        out.warn(f"nvidia-smi is not usable ({smi.text().splitlines()[-1] if smi.text() else 'no output'}); "
                 f"the agent will simulate {job.simulate_gpus} GPU(s)")
    else:
        raise StepFailed("nvidia-smi is missing or failing: install the NVIDIA driver first (or simulate GPUs)",
                         smi.text())
    facts["gpus"] = [g.as_dict() for g in gpus]
    if gpus:
        driver = gpus[0].driver_version
        facts["driver_version"] = driver
        out.ok(f"NVIDIA driver {driver}, {len(gpus)} GPU(s):")
        for g in gpus:
            mig = {True: "enabled", False: "disabled", None: "not supported"}[g.mig_current]
            memory = f"{g.memory_total_mib} MiB" if g.memory_total_mib is not None else "memory unknown"
            out.ok(f"  GPU {g.index}: {g.name}, {memory}, {g.pci_bus_id}, MIG {mig}")
            if g.mig_pending is not None and g.mig_pending != g.mig_current:
                out.warn(f"GPU {g.index}: a MIG mode change is pending (takes effect after a GPU reset)")
        _compare_driver(driver, out, facts)

    df = r.run(f"d={r.q_dir}; while [ ! -d \"$d\" ]; do d=$(dirname \"$d\"); done; df -Pk \"$d\"", "df")
    try:
        free = parse_df_available_mib(df.stdout)
    except ValueError as exc:
        raise StepFailed(f"cannot read df's output: {exc}", df.text()) from None
    facts["free_mib"] = free
    if free < MIN_FREE_MIB:
        raise StepFailed(f"only {free} MiB free for {r.dir}; the agent needs at least {MIN_FREE_MIB} MiB", df.text())
    out.ok(f"disk: {free} MiB free for {r.dir}")

    before = time.time()
    remote = r.run("date +%s", "date").stdout.strip()
    after = time.time()
    if not remote.isdigit():
        raise StepFailed(f"date +%s printed {remote!r}")
    skew = int(remote) - (before + after) / 2
    facts["clock_skew_s"] = round(skew, 1)
    if abs(skew) > CLOCK_FAIL_S:
        raise StepFailed(f"the node's clock is {skew:+.0f} s off the portal's: fix time sync (chrony/NTP) first; "
                         "the portal refuses batches from the future and mis-times the others")
    if abs(skew) > CLOCK_WARN_S:
        out.warn(f"the node's clock is {skew:+.1f} s off the portal's (is NTP running?)")
    else:
        out.ok(f"clock: within {CLOCK_WARN_S:.0f} s of the portal ({skew:+.1f} s)")

    init = r.remote.run("[ -d /run/systemd/system ] && command -v systemctl >/dev/null && echo systemd || echo none")
    job.init_system = "systemd" if init.stdout.strip() == "systemd" else "none"
    if job.init_system == "systemd":
        if r.dir.startswith(HIDDEN_FROM_UNIT):
            raise StepFailed(f"{r.dir} is hidden from the hardened systemd unit (ProtectHome/PrivateTmp): "
                             "choose an install dir such as /opt/tokenmill-agent")
        out.ok("init: systemd (the agent runs as a hardened unit)")
    else:
        out.warn("no systemd on this host: the agent will run as a detached process (setsid) with a pid file, "
                 "and will not be restarted after a crash or reboot")
    facts["init_system"] = job.init_system
    job.facts = facts
    job.save(update_fields=["facts", "init_system"])
    return out


def _compare_driver(driver: str, out: Outcome, facts: dict) -> None:
    baseline = current_baseline()
    if baseline is None or not baseline.driver_version:
        out.ok("no fleet baseline for the driver: version recorded only")
        return
    facts["baseline_driver"] = baseline.driver_version
    try:
        order = compare(driver, baseline.driver_version)
    except ValueError:
        out.warn(f"driver version {driver!r} cannot be compared with the baseline {baseline.driver_version}")
        return
    if order == 0:
        out.ok(f"driver matches the fleet baseline {baseline.driver_version}")
    else:
        side = "behind" if order < 0 else "ahead of"
        out.warn(f"driver {driver} is {side} the fleet baseline {baseline.driver_version}")


@step("upload", "Upload agent wheels (SFTP)", needs_ssh=True)
def step_upload(r: Runner) -> Outcome:
    wheels = r.wheels()
    out = Outcome()
    staging = r.remote.run("mktemp -d /tmp/tokenmill-upload.XXXXXXXX", privileged=False)
    if not staging.ok:
        raise StepFailed("cannot create an upload directory in /tmp", staging.text())
    stage = staging.stdout.strip()
    try:
        for wheel in wheels.all:
            r.remote.put(wheel, f"{stage}/{wheel.name}")
            out.ok(f"uploaded {wheel.name} ({wheel.stat().st_size // 1024} KiB)")
        sums = r.run(f"cd {shlex.quote(stage)} && sha256sum *.whl", "sha256sum").stdout
        remote = {line.split()[1].lstrip("*"): line.split()[0] for line in sums.splitlines() if line.strip()}
        for wheel in wheels.all:
            if remote.get(wheel.name) != _sha256(wheel):
                raise StepFailed(f"{wheel.name} arrived corrupted (SHA-256 differs)")
        out.ok("SHA-256 of every wheel verified on the node")
        r.run(f"rm -rf {r.q_dir}/wheels && install -d -m 0755 {r.q_dir} {r.q_dir}/wheels && "
              f"install -m 0644 {shlex.quote(stage)}/*.whl {r.q_dir}/wheels/", "installing the wheels")
        out.ok(f"wheels in {r.dir}/wheels")
    finally:
        r.remote.run(f"rm -rf {shlex.quote(stage)}", privileged=False)
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@step("install", "Install into a virtualenv (offline)", needs_ssh=True)
def step_install(r: Runner) -> Outcome:
    wheels, out, venv = r.wheels(), Outcome(), f"{r.q_dir}/venv"
    result = r.run(f"python3 -m venv --clear --without-pip {venv}", "creating the virtualenv")
    out.ok(f"virtualenv {r.dir}/venv created" + (f"\n{result.text()}" if result.text() else ""))
    version = wheels.agent.name.split("-")[1]
    pip = f"{r.q_dir}/wheels/{shlex.quote(wheels.pip.name)}/pip"
    result = r.run(f"{venv}/bin/python {pip} install --disable-pip-version-check --no-input --no-cache-dir "
                   f"--no-index --find-links {r.q_dir}/wheels 'tokenmill-agent=={version}'",
                   "pip install (offline)", timeout=600)
    out.ok(result.text())
    check = r.run(f"{venv}/bin/tokenmill-agent --version", "running the installed agent")
    out.ok(f"installed: {check.text()}")
    return out


def agent_toml(*, portal_url: str, state_dir: str, hostname: str, simulate_gpus: int) -> str:
    # JSON strings are valid TOML basic strings (same escapes), so values cannot break out of their quotes.
    lines = [
        "# Written by Tokenmill provisioning. See agent.example.toml in the agent package for every key.",
        f"portal_url = {json.dumps(portal_url)}",
        f"state_dir = {json.dumps(state_dir)}",
        f"hostname = {json.dumps(hostname)}",
    ]
    if simulate_gpus:
        lines += ["", "[simulate]", f"gpus = {int(simulate_gpus)}"]
    return "\n".join(lines) + "\n"


@step("configure", "Write the agent configuration", needs_ssh=True)
def step_configure(r: Runner) -> Outcome:
    job = r.job
    text = agent_toml(portal_url=job.portal_url, state_dir=r.state_dir, hostname=job.node_name,
                      simulate_gpus=job.simulate_gpus)
    r.put_file(f"{r.dir}/agent.toml", text.encode(), mode=0o644)
    check = r.run(f"{r.q_dir}/venv/bin/tokenmill-agent --config {r.q_dir}/agent.toml status", "agent status")
    out = Outcome()
    out.ok(f"{r.dir}/agent.toml:\n{text}")
    out.ok(check.text())
    return out


@step("enroll", "Enroll with a one-time token", needs_ssh=True)
def step_enroll(r: Runner) -> Outcome:
    job = r.job
    token, value = enrollment_token_create(site=job.site, created_by=job.created_by, ttl=ENROLL_TOKEN_TTL,
                                           note=f"provisioning job {job.pk} ({job.node_name})")
    job.enrollment_token = token
    job.save(update_fields=["enrollment_token"])
    # The token is on the command line of a short-lived process only; it is one-time and expires within the hour.
    result = r.remote.run(f"{r.q_dir}/venv/bin/tokenmill-agent --config {r.q_dir}/agent.toml enroll "
                       f"--token {shlex.quote(value)}", timeout=60)
    token.refresh_from_db()
    if not result.ok or token.node_id is None:
        unused_token_expire(job)
        raise StepFailed(f"enrollment failed (exit status {result.exit_status}): can the node reach "
                         f"{job.portal_url}?", result.text())
    job.node_id = token.node_id
    job.save(update_fields=["node"])
    out = Outcome()
    out.ok(result.text())
    out.ok(f"node {job.node_name} (id {token.node_id}) enrolled at site {job.site.name}; "
           f"token tme_{token.prefix}_… used")
    return out


def unit_text(*, install_dir: str) -> str:
    """The packaged hardened unit, pointed at the provisioned virtualenv and config."""
    packaged = (settings.BASE_DIR / "agents" / "systemd" / "tokenmill-agent.service").read_text()
    exec_start = f"ExecStart={install_dir}/venv/bin/tokenmill-agent run --config {install_dir}/agent.toml"
    lines = [exec_start if line.startswith("ExecStart=") else line for line in packaged.splitlines()]
    return "\n".join(lines) + "\n"


@step("start", "Start the agent", needs_ssh=True)
def step_start(r: Runner) -> Outcome:
    out = Outcome()
    if r.job.init_system == "systemd":
        r.put_file(UNIT_PATH, unit_text(install_dir=r.dir).encode(), mode=0o644)
        r.run("systemctl daemon-reload && systemctl enable tokenmill-agent.service && "
              "systemctl restart tokenmill-agent.service", "starting the unit")
        time.sleep(2)
        status = r.remote.run("systemctl is-active tokenmill-agent.service")
        if status.stdout.strip() != "active":
            logs = r.remote.run("journalctl -u tokenmill-agent.service -n 30 --no-pager")
            raise StepFailed("the unit is not active", logs.text())
        out.ok(f"{UNIT_PATH} installed, enabled and active")
        return out
    pid, logf = f"{r.q_dir}/agent.pid", f"{r.q_dir}/agent.log"
    r.run(stop_detached(pid), "stopping a previous agent")
    # One simple command in the background (not a list), so $! is the agent itself (setsid and nohup exec it) and
    # no shell keeps the SSH channel's output open.
    r.run(f"setsid nohup {r.q_dir}/venv/bin/tokenmill-agent --config {r.q_dir}/agent.toml run "
          f">> {logf} 2>&1 < /dev/null & echo $! > {pid}", "starting the agent")
    time.sleep(1.5)
    alive = r.remote.run(f"kill -0 \"$(cat {pid})\"")
    if not alive.ok:
        logs = r.remote.run(f"tail -n 30 {logf}")
        raise StepFailed("the agent exited right after starting", logs.text())
    out.ok(f"agent running detached (pid {r.remote.run(f'cat {pid}').stdout.strip()}), log {r.dir}/agent.log")
    out.warn("no systemd: the agent is not restarted after a crash or reboot (see docs/provisioning.md)")
    return out


def stop_detached(pid: str) -> str:
    """Shell that stops the process in a pid file (TERM, then KILL after 10 s) and removes the file."""
    return (f"if [ -f {pid} ]; then p=$(cat {pid}); if kill -0 \"$p\" 2>/dev/null; then kill -TERM \"$p\"; "
            "i=0; while kill -0 \"$p\" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; "
            f"kill -KILL \"$p\" 2>/dev/null; fi; rm -f {pid}; fi; true")


@step("first_batch", "Wait for the first batch", needs_ssh=False)
def step_first_batch(r: Runner) -> Outcome:
    from portal.telemetry.models import IngestedBatch

    job = r.job
    if job.node_id is None:
        raise StepFailed("the node did not enroll")
    started = time.monotonic()
    while True:
        batch = IngestedBatch.objects.filter(node_id=job.node_id).order_by("received_at").first()
        if batch is not None:
            out = Outcome()
            out.ok(f"first batch (seq {batch.seq}, {batch.gpu_count} GPU(s)) received "
                   f"{batch.received_at:%Y-%m-%d %H:%M:%S} UTC, {time.monotonic() - started:.1f} s after the start")
            return out
        if time.monotonic() - started > FIRST_BATCH_TIMEOUT_S:
            where = "journalctl -u tokenmill-agent" if job.init_system == "systemd" else f"{r.dir}/agent.log"
            tail = ""
            if r.conn is not None:
                cmd = ("journalctl -u tokenmill-agent -n 30 --no-pager" if job.init_system == "systemd"
                       else f"tail -n 30 {r.q_dir}/agent.log")
                tail = r.remote.run(cmd).text()
            raise StepFailed(f"no batch from {job.node_name} within {FIRST_BATCH_TIMEOUT_S:.0f} s: see {where} and "
                             f"check that the node reaches {job.portal_url}", tail)
        r.check_cancelled()
        r.heartbeat()
        time.sleep(FIRST_BATCH_POLL_S)
