from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("telemetry", "0001_initial"),
    ]

    operations = [
        migrations.RenameField(model_name="rollupwatermark", old_name="received_until", new_name="stored_until"),
        migrations.RenameField(model_name="gpusample", old_name="received_at", new_name="stored_at"),
        migrations.AlterField(
            model_name="gpusample", name="stored_at",
            field=models.DateTimeField(help_text="When the store worker wrote it; retention deletes only rolled-up rows"),
        ),
        migrations.RenameField(model_name="usagesample", old_name="received_at", new_name="stored_at"),
        migrations.AlterField(
            model_name="usagesample", name="stored_at",
            field=models.DateTimeField(help_text="When the store worker wrote it; retention deletes only rolled-up rows"),
        ),
        migrations.AddField(
            model_name="ingestedbatch", name="payload",
            field=models.BinaryField(help_text="The validated batch as JSON, until the store worker took it", null=True),
        ),
        migrations.AddField(
            model_name="ingestedbatch", name="stored_at",
            field=models.DateTimeField(db_index=True, help_text="When its rows reached the storage tiers", null=True),
        ),
        migrations.AddField(
            model_name="ingestedbatch", name="store_error",
            field=models.TextField(blank=True, help_text="Why the store worker could not store it (payload kept)"),
        ),
        # Batches stored before this migration are stored.
        migrations.RunSQL("UPDATE telemetry_ingestedbatch SET stored_at = received_at", migrations.RunSQL.noop),
        migrations.AddIndex(
            model_name="ingestedbatch",
            index=models.Index(condition=models.Q(("stored_at__isnull", True)), fields=["id"], name="batch_pending"),
        ),
    ]
