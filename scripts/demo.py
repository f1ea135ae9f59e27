"""`make demo`: migrate, seed once, then run the portal (gunicorn), a Celery worker with beat, and one simulated
agent per demo node, until Ctrl-C stops them all. SQLite and a filesystem broker: nothing to install."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PORT = int(os.environ.get("DEMO_PORT", "8000"))
URL = f"http://127.0.0.1:{PORT}"


def run(*args: str) -> None:
    subprocess.run([str(BIN / "python"), "manage.py", *args], cwd=ROOT, check=True)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def main() -> int:
    if not port_free(PORT):
        print(f"Port {PORT} is in use; stop what runs there or set DEMO_PORT.", file=sys.stderr)
        return 1
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
    # As in production: DEBUG off (styled error pages, no settings on show), static files from whitenoise.
    os.environ.setdefault("DEBUG", "0")
    run("migrate", "--noinput", "-v", "0")
    run("collectstatic", "--noinput", "-v", "0")
    run("seed_demo", "--if-empty", "--portal-url", URL)
    var = Path(os.environ.get("TOKENMILL_VAR_DIR") or ROOT / "var")
    logs = var / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    commands = {
        # Threads (gthread) with keep-alive above the agents' 30 s send period, as deployed (docs/deploy.md).
        "portal": [str(BIN / "gunicorn"), "portal.wsgi", "--bind", f"127.0.0.1:{PORT}", "--workers", "2",
                   "--threads", "4", "--keep-alive", "75", "--access-logfile", "-"],
        # Two workers: the default queue (rollups, offline detection, alerts; beat embedded) never waits behind
        # the long one (re-attribution, invoices, SLA evaluation, the books, provisioning).
        "worker": [str(BIN / "celery"), "-A", "portal", "worker", "--beat", "--pool", "solo", "--loglevel", "INFO",
                   "-Q", "celery", "-n", "default@%h", "--schedule", str(var / "celerybeat-schedule")],
        "worker-long": [str(BIN / "celery"), "-A", "portal", "worker", "--pool", "solo", "--loglevel", "INFO",
                        "-Q", "long", "-n", "long@%h"],
        "store": [str(BIN / "python"), "manage.py", "store_batches"],
    }
    for config in sorted((var / "agents").glob("*/agent.toml")):
        commands[f"agent-{config.parent.name}"] = [str(BIN / "tokenmill-agent"), "--config", str(config), "run"]
    children = {}
    for name, command in commands.items():
        log = open(logs / f"{name}.log", "ab")  # noqa: SIM115 - kept open for the child's lifetime
        children[name] = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True)
    agents = sum(1 for n in children if n.startswith("agent-"))
    print(f"""
Tokenmill demo running at {URL}
  operator (admin):  operator / tokenmill-demo
  operator (viewer): viewer / tokenmill-demo
  tenant admin:      acme-admin / tokenmill-demo
{agents} SIMULATED agents (no GPU here: readings are simulated) report every 10 s.
Logs: {logs}. Ctrl-C stops everything.
""", flush=True)
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        while not stopping:
            for name, child in children.items():
                if child.poll() is not None and name in ("portal", "worker", "worker-long", "store"):
                    print(f"{name} exited ({child.returncode}); see {logs / (name + '.log')}", file=sys.stderr)
                    stopping = True
            time.sleep(0.5)
    finally:
        print("Stopping...", flush=True)
        for child in children.values():
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGTERM)
        deadline = time.time() + 10
        for child in children.values():
            try:
                child.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
