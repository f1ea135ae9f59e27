from datetime import timedelta

from django.core.management.base import BaseCommand, CommandError

from portal.fleet.models import Site
from portal.fleet.services import enrollment_token_create


class Command(BaseCommand):
    help = "Create a one-time enrollment token for a site and print it (it is not stored in clear)."

    def add_arguments(self, parser):
        parser.add_argument("--site", required=True, help="Site slug")
        parser.add_argument("--hours", type=int, default=24, help="Validity in hours (default 24)")
        parser.add_argument("--note", default="")

    def handle(self, *args, site, hours, note, **options):
        try:
            site_obj = Site.objects.get(slug=site)
        except Site.DoesNotExist:
            known = ", ".join(Site.objects.values_list("slug", flat=True)) or "none"
            raise CommandError(f"No site {site!r} (known: {known})") from None
        if hours < 1:
            raise CommandError("--hours must be at least 1")
        token, value = enrollment_token_create(site=site_obj, created_by=None, ttl=timedelta(hours=hours), note=note)
        self.stdout.write(value)
        self.stderr.write(f"One-time token for {site_obj.name}, valid until {token.expires_at:%Y-%m-%d %H:%M} UTC.")
