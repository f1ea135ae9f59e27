"""A real Celery worker process against the test database and the configured broker."""

import os
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from django.conf import settings
from django.db import connection

from portal.celery import app as celery_app


def database_url() -> str:
    db = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{db['NAME']}"
    auth = db["USER"] + (f":{db['PASSWORD']}" if db.get("PASSWORD") else "")
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


@contextmanager
def celery_worker():
    """Start `celery worker` on a queue of its own (so no other worker on this machine takes its tasks); yields
    the queue name. The worker is killed on exit."""
    queue = f"test-{uuid.uuid4().hex[:8]}"
    # Provisioning jobs the worker queues itself (an install's acceptance test) come back to this worker.
    env = {**os.environ, "DATABASE_URL": database_url(), "CELERY_BROKER_URL": celery_app.conf.broker_url,
           "PROVISIONING_QUEUE": queue}
    env.pop("CELERY_TASK_ALWAYS_EAGER", None)
    celery = Path(sys.executable).parent / "celery"
    log = settings.VAR_DIR / f"{queue}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(celery), "-A", "portal", "worker", "--pool", "solo", "-Q", queue, "--loglevel", "INFO",
             "--without-heartbeat", "--without-gossip", "--without-mingle"],
            cwd=settings.BASE_DIR, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    celery_app.conf.task_always_eager = False
    try:
        yield queue, proc
    finally:
        celery_app.conf.task_always_eager = True
        proc.kill()
        proc.wait(timeout=10)
        log.unlink(missing_ok=True)


@contextmanager
def store_worker():
    """Start the store worker (`manage.py store_batches`) against the test database; stopped with SIGTERM on exit,
    as systemd stops it. Yields the process."""
    env = {**os.environ, "DATABASE_URL": database_url()}
    log = settings.VAR_DIR / f"store-{uuid.uuid4().hex[:8]}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "manage.py", "store_batches", "--idle", "0.1"],
                                cwd=settings.BASE_DIR, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(f"the store worker did not stop on SIGTERM; see {log}") from None
        log.unlink(missing_ok=True)


@contextmanager
def gunicorn_server(*, workers: int = 2, env: dict[str, str] | None = None, options: tuple[str, ...] = ()):
    """Serve the portal with gunicorn (as in production; `options` added to its command line) on a free loopback
    port against the test database; yields (base URL, access log path). The access log names the worker process
    of each request."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    tag = uuid.uuid4().hex[:8]
    log, access = settings.VAR_DIR / f"gunicorn-{tag}.log", settings.VAR_DIR / f"gunicorn-{tag}-access.log"
    environment = {**os.environ, "DATABASE_URL": database_url(), **(env or {})}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "gunicorn"), "portal.wsgi", "--bind", f"127.0.0.1:{port}",
             "--workers", str(workers), "--access-logfile", str(access), "--access-logformat", "%(p)s %(s)s %(U)s",
             *options],
            cwd=settings.BASE_DIR, env=environment, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        def listening() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:
                return proc.poll() is not None  # exited: stop waiting, the assertion below says why
            return True

        wait_until(listening, timeout=60, what="gunicorn to listen")
        assert proc.poll() is None, log.read_text()
        yield f"http://127.0.0.1:{port}", access
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.unlink(missing_ok=True)
        access.unlink(missing_ok=True)


def wait_until(predicate, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
