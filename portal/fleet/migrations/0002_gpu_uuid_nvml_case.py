"""GPU UUIDs in NVML's form (upper-case "GPU-", lower-case rest): ingest now normalises them, so a UUID stored in
another case would otherwise be claimed a second time. One whose NVML form is already taken is left as it was."""

from django.db import migrations


def normalise(apps, schema_editor):
    Gpu = apps.get_model("fleet", "Gpu")
    taken = set(Gpu.objects.values_list("uuid", flat=True))
    for gpu in Gpu.objects.order_by("pk").iterator():
        if gpu.uuid[:4].upper() != "GPU-":
            continue
        nvml = "GPU-" + gpu.uuid[4:].lower()
        if nvml != gpu.uuid and nvml not in taken:
            taken.add(nvml)
            gpu.uuid = nvml
            gpu.save(update_fields=["uuid"])


class Migration(migrations.Migration):
    dependencies = [("fleet", "0001_initial")]
    operations = [migrations.RunPython(normalise, migrations.RunPython.noop)]
