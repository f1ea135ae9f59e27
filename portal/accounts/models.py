from django.contrib.auth.models import AbstractUser
from django.db import models


class OperatorRole(models.TextChoices):
    NONE = "", "Not an operator"
    VIEWER = "viewer", "Operator (viewer)"
    ADMIN = "admin", "Operator (admin)"


class User(AbstractUser):
    """A person. Operators run the factory; tenant users belong to tenants through tenants.Membership."""

    email = models.EmailField(unique=True)
    operator_role = models.CharField(max_length=16, choices=OperatorRole.choices, blank=True, default="")

    @property
    def is_operator(self) -> bool:
        return self.operator_role in (OperatorRole.VIEWER, OperatorRole.ADMIN)

    @property
    def is_operator_admin(self) -> bool:
        return self.operator_role == OperatorRole.ADMIN
