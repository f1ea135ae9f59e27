from django.apps import AppConfig


class EconomicsConfig(AppConfig):
    name = "portal.economics"
    label = "economics"
