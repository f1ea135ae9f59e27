from django.contrib import admin

from portal.tenants.models import ApiKey, Invitation, Membership, Plan, Tenant


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    list_display = ("name", "slug", "status", "plan", "created_at")
    list_filter = ("status", "plan")
    search_fields = ("name", "slug")


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ("user", "tenant", "role")
    list_select_related = ("user", "tenant")


@admin.register(Plan)
class PlanAdmin(admin.ModelAdmin):
    list_display = ("name", "tokens_per_minute", "gpus")


@admin.register(Invitation)
class InvitationAdmin(admin.ModelAdmin):
    list_display = ("email", "tenant", "role", "created_at", "accepted_at", "revoked_at")
    list_select_related = ("tenant",)


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ("name", "tenant", "prefix", "created_at", "last_used_at", "revoked_at")
    list_select_related = ("tenant",)
    readonly_fields = ("prefix", "digest", "last_used_at")
