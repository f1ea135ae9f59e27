from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from portal.demo.seed import DEMO_PASSWORD, seed_demo
from portal.fleet.models import Site


class Command(BaseCommand):
    help = "Seed the demo factory (2 sites, 16 nodes of 8 GPUs, tenants, 30 days of history)."

    def add_arguments(self, parser):
        parser.add_argument("--days", type=int, default=30)
        parser.add_argument("--agents-dir", type=Path, default=settings.VAR_DIR / "agents",
                            help="Where to write each simulated agent's config and credential")
        parser.add_argument("--portal-url", default="http://127.0.0.1:8000")
        parser.add_argument("--if-empty", action="store_true", help="Do nothing when the database has sites")

    def handle(self, *args, days, agents_dir, portal_url, if_empty, **options):
        if Site.objects.exists():
            if if_empty:
                self.stdout.write("Demo data already present; not seeding again.")
                return
            raise CommandError("The database already has sites; seed a fresh database (or use --if-empty).")
        summary = seed_demo(days=days, agents_dir=agents_dir, portal_url=portal_url)
        self.stdout.write(self.style.SUCCESS(
            f"Seeded {summary['nodes']} nodes / {summary['gpus']} GPUs, {summary['tenants']} tenants, "
            f"{days} days of history. Logins: operator / {DEMO_PASSWORD} (operator admin), "
            f"viewer / {DEMO_PASSWORD}, acme-admin / {DEMO_PASSWORD} (tenant)."
        ))
