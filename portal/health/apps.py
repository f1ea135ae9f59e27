from django.apps import AppConfig


class HealthConfig(AppConfig):
    name = "portal.health"
    verbose_name = "Health policy"
