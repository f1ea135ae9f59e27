"""The store worker: moves accepted agent batches into the telemetry tiers, a few hundred per transaction."""

import logging
import signal
import threading

from django.core.management.base import BaseCommand
from django.db import InterfaceError, OperationalError, close_old_connections, connection

from portal.telemetry.store import STORE_BATCHES, batches_requeue_set_aside, batches_store

logger = logging.getLogger(__name__)


class Command(BaseCommand):
    help = "Store accepted agent batches into the telemetry tiers, until stopped (or once with --once)."

    def add_arguments(self, parser):
        parser.add_argument("--once", action="store_true", help="store every waiting batch, then exit")
        parser.add_argument("--batches", type=int, default=STORE_BATCHES, help="batches per transaction")
        parser.add_argument("--idle", type=float, default=0.2,
                            help="seconds to wait when the queue runs short (batches gather meanwhile)")
        parser.add_argument("--retry-failed", action="store_true",
                            help="queue the batches set aside with a store error again, then carry on")

    def handle(self, *args, once: bool, batches: int, idle: float, retry_failed: bool, **options):
        if retry_failed:
            self.stdout.write(f"{batches_requeue_set_aside()} batches queued again")
        stop = threading.Event()
        if not once:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: stop.set())
        stored = 0
        while not stop.is_set():
            if not connection.in_atomic_block:  # (inside one only when called from a test's transaction)
                close_old_connections()  # a long-running process: drop a broken or expired connection
            try:
                taken = batches_store(limit=batches)
            except (OperationalError, InterfaceError):
                if once:
                    raise
                logger.exception("the database is unavailable; retrying in 5 s")
                stop.wait(5)
                continue
            stored += taken
            if taken < batches:
                if once:
                    break
                # A short queue: wait a moment so the next flush shares its commit with more batches.
                stop.wait(idle)
        if once:
            self.stdout.write(f"{stored} batches stored")
