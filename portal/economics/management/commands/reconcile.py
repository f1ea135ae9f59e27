"""`manage.py reconcile [--month YYYY-MM]`: check the books of a month (default: this one) and print each break."""

from datetime import datetime

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from portal.economics.books import books_reconcile, month_of


class Command(BaseCommand):
    help = "Check the month's books (cost, capacity, existence, tokens, revenue); exit 1 on any break."

    def add_arguments(self, parser):
        parser.add_argument("--month", help="YYYY-MM (default: the current month, up to its last attributed hour)")

    def handle(self, *args, month: str | None, **options):
        if month:
            try:
                first = datetime.strptime(month, "%Y-%m").date()
            except ValueError:
                raise CommandError(f"--month must be YYYY-MM, not {month!r}") from None
        else:
            first = month_of(timezone.now())
        books = books_reconcile(month=first)
        self.stdout.write(f"Books of {books.month:%B %Y}, through {books.through:%Y-%m-%d %H:%M} UTC")
        for check in books.checks:
            state = "ok" if check.ok else f"{len(check.breaks)} break(s)"
            self.stdout.write(f"  {check.title}: {check.checked} checked, {state}")
            for found in check.breaks[:50]:
                self.stdout.write(f"    - {found.scope}: {found.size} ({found.cause})")
        if books.breaks:
            raise CommandError(f"{books.breaks} break(s) in the books of {books.month:%B %Y}", returncode=1)
        self.stdout.write("0 breaks")
