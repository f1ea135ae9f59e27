import json

from django.core.management.base import BaseCommand

from portal.api import api


class Command(BaseCommand):
    help = "Print the OpenAPI document of the portal's JSON API (docs/openapi.json is this output)."

    def handle(self, *args, **options):
        self.stdout.write(json.dumps(api.get_openapi_schema(), indent=2, sort_keys=True))
