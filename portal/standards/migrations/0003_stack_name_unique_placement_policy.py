"""Stack names are unique once every existing row has one (0002 names them, in its own transaction, so
PostgreSQL adds the index after the rows are written); the placement policy."""

import django.core.validators
import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models

NAME = django.core.validators.RegexValidator(
    "^[0-9A-Za-z][0-9A-Za-z._-]*$", "Enter a version name such as 2026.12 (letters, digits, dots, - and _).")


class Migration(migrations.Migration):

    dependencies = [
        ("standards", "0002_certified_stack"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.AlterField("certifiedstack", "name", models.CharField(
            help_text="The name operators use for this stack, e.g. 2026.12", max_length=32, unique=True,
            validators=[NAME], verbose_name="Stack version")),
        migrations.CreateModel(
            name="PlacementPolicy",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("exclude_off_stack", models.BooleanField(
                    default=False, verbose_name="Exclude nodes off the certified stack from new placements")),
                ("note", models.CharField(blank=True, help_text="Why it changed, e.g. a ticket", max_length=200)),
                ("created_at", models.DateTimeField()),
                ("created_by", models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL,
                                                 related_name="+", to=settings.AUTH_USER_MODEL)),
            ],
            options={"ordering": ["-created_at", "-pk"], "verbose_name_plural": "placement policies"},
        ),
    ]
