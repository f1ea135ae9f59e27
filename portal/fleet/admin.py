from django.contrib import admin

from portal.fleet.models import Gpu, HealthEvent, Node, Site


@admin.register(Site)
class SiteAdmin(admin.ModelAdmin):
    list_display = ("name", "currency", "gpu_capex", "depreciation_months", "energy_price_kwh", "pue")


@admin.register(Node)
class NodeAdmin(admin.ModelAdmin):
    list_display = ("hostname", "site", "status", "last_seen", "driver_version", "simulated")
    list_filter = ("site", "status", "simulated")
    list_select_related = ("site",)


@admin.register(Gpu)
class GpuAdmin(admin.ModelAdmin):
    list_display = ("uuid", "node", "index", "name", "mig_mode")
    list_select_related = ("node",)


@admin.register(HealthEvent)
class HealthEventAdmin(admin.ModelAdmin):
    list_display = ("at", "node", "gpu", "kind", "code")
    list_select_related = ("node", "gpu")
