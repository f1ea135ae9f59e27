from django.contrib import admin
from django.contrib.auth.admin import UserAdmin as BaseUserAdmin

from portal.accounts.models import User


@admin.register(User)
class UserAdmin(BaseUserAdmin):
    fieldsets = (*BaseUserAdmin.fieldsets, ("Tokenmill", {"fields": ("operator_role",)}))
    list_display = ("username", "email", "operator_role", "is_staff")
