from django.apps import AppConfig


class BringupConfig(AppConfig):
    name = "portal.bringup"
    verbose_name = "Bring-up"
