"""The fleet baseline becomes a named, versioned certified stack, pinning TensorRT-LLM and NeMo too; every
baseline already set becomes a stack version named by its day."""

import django.core.validators
from django.db import migrations, models

DOTTED = django.core.validators.RegexValidator(
    "^\\d+(\\.\\d+)*$", "Enter a dotted numeric version such as 590.48.01 (digits and dots only).")


def name_by_date(apps, schema_editor):
    """Each baseline already set becomes a stack version named by the UTC day it was set (2026.11.26); a second
    one on the same day gets -2, and so on, oldest first."""
    stack = apps.get_model("standards", "CertifiedStack")
    taken: set[str] = set()
    for row in stack.objects.order_by("created_at", "pk"):
        base = row.created_at.strftime("%Y.%m.%d")
        name, n = base, 1
        while name in taken:
            n += 1
            name = f"{base}-{n}"
        taken.add(name)
        row.name = name
        row.save(update_fields=["name"])


class Migration(migrations.Migration):

    dependencies = [("standards", "0001_initial")]

    operations = [
        migrations.RenameModel("Baseline", "CertifiedStack"),
        migrations.AddField("certifiedstack", "name", models.CharField(default="", max_length=32)),
        migrations.AddField("certifiedstack", "tensorrt_llm_version", models.CharField(
            blank=True, max_length=64, validators=[DOTTED], verbose_name="TensorRT-LLM")),
        migrations.AddField("certifiedstack", "nemo_version", models.CharField(
            blank=True, max_length=64, validators=[DOTTED], verbose_name="NeMo")),
        migrations.AlterField("certifiedstack", "triton_version", models.CharField(
            blank=True, max_length=64, validators=[DOTTED], verbose_name="Triton")),
        migrations.RunPython(name_by_date, migrations.RunPython.noop),
    ]
