"""Price books and invoices.

A PriceBook belongs to a plan and fixes its currency. Prices (per model, per million input and output tokens) and
the minimum monthly commitment are versioned by `effective_from`: a change is a new row taking effect on a date not
in the past, never an edit of a row, so a period already billed always reads the prices it was billed with.

An Invoice covers one tenant and one calendar month (UTC), unique per (tenant, month). A draft is recomputed on
demand; once issued, the invoice and its lines are immutable: the services refuse, and so do the models' save()
and delete() and their querysets' update() and delete().
"""

from decimal import Decimal

from django.conf import settings
from django.core.validators import MinValueValidator, RegexValidator
from django.db import models
from django.db.models import Q

CURRENCY = RegexValidator(r"^[A-Z]{3}$", "An ISO 4217 code of three capital letters, e.g. USD")


class ImmutableError(Exception):
    """An attempt to change a row that is fixed once written (a used price, an issued invoice)."""


class _AppendOnly(models.Model):
    """Rows that are written once: a change is a new version."""

    class Meta:
        abstract = True

    def save(self, *args, **kwargs):
        if not self._state.adding:
            raise ImmutableError(f"{type(self).__name__} rows are never updated: add a new version")
        super().save(*args, **kwargs)


class PriceBook(models.Model):
    plan = models.OneToOneField("tenants.Plan", on_delete=models.PROTECT, related_name="price_book")
    currency = models.CharField(max_length=3, validators=[CURRENCY])
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["plan__name"]

    def __str__(self) -> str:
        return f"Price book of {self.plan} ({self.currency})"


class ModelPrice(_AppendOnly):
    book = models.ForeignKey(PriceBook, on_delete=models.PROTECT, related_name="prices")
    model_name = models.CharField(max_length=200, help_text="As deployed, e.g. meta-llama/Llama-3.1-8B-Instruct")
    effective_from = models.DateField(help_text="First UTC day this price applies")
    input_per_mtok = models.DecimalField(max_digits=12, decimal_places=6, validators=[MinValueValidator(Decimal(0))],
                                         verbose_name="input price per million tokens")
    output_per_mtok = models.DecimalField(max_digits=12, decimal_places=6, validators=[MinValueValidator(Decimal(0))],
                                          verbose_name="output price per million tokens")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True,
                                   related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["model_name", "-effective_from"]
        constraints = [models.UniqueConstraint(fields=["book", "model_name", "effective_from"],
                                               name="modelprice_book_model_from_unique")]

    def __str__(self) -> str:
        return f"{self.model_name} from {self.effective_from}: {self.input_per_mtok}/{self.output_per_mtok}"


class Commitment(_AppendOnly):
    """The minimum a tenant on the plan pays per month; the version in force on the month's first day applies."""

    book = models.ForeignKey(PriceBook, on_delete=models.PROTECT, related_name="commitments")
    effective_from = models.DateField()
    monthly_minimum = models.DecimalField(max_digits=14, decimal_places=2, validators=[MinValueValidator(Decimal(0))])
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True,
                                   related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-effective_from"]
        constraints = [models.UniqueConstraint(fields=["book", "effective_from"],
                                               name="commitment_book_from_unique")]

    def __str__(self) -> str:
        return f"{self.book.currency} {self.monthly_minimum} per month from {self.effective_from}"


class InvoiceStatus(models.TextChoices):
    DRAFT = "draft", "Draft"
    ISSUED = "issued", "Issued"


class InvoiceQuerySet(models.QuerySet):
    def update(self, **kwargs):
        if self.filter(status=InvoiceStatus.ISSUED).exists():
            raise ImmutableError("issued invoices cannot be changed")
        return super().update(**kwargs)

    def delete(self):
        if self.filter(status=InvoiceStatus.ISSUED).exists():
            raise ImmutableError("issued invoices cannot be deleted")
        return super().delete()


class Invoice(models.Model):
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.PROTECT, related_name="invoices")
    period_start = models.DateField(help_text="First day of the month (UTC)")
    period_end = models.DateField(help_text="First day of the next month (exclusive)")
    number = models.CharField(max_length=40, unique=True)
    currency = models.CharField(max_length=3, validators=[CURRENCY])
    status = models.CharField(max_length=8, choices=InvoiceStatus.choices, default=InvoiceStatus.DRAFT)
    input_tokens = models.BigIntegerField(default=0)
    output_tokens = models.BigIntegerField(default=0)
    usage_amount = models.DecimalField(max_digits=16, decimal_places=2, default=Decimal(0))
    commitment_topup = models.DecimalField(max_digits=16, decimal_places=2, default=Decimal(0))
    credits = models.DecimalField(max_digits=16, decimal_places=2, default=Decimal(0),
                                  help_text="SLA credits, as a positive amount subtracted from the charges")
    total = models.DecimalField(max_digits=16, decimal_places=2, default=Decimal(0))
    usage_through = models.DateTimeField(help_text="Usage counted up to here (the month's end once closed)")
    computed_at = models.DateTimeField()
    issued_at = models.DateTimeField(null=True, blank=True)
    issued_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True,
                                  related_name="+")

    objects = InvoiceQuerySet.as_manager()

    class Meta:
        ordering = ["-period_start", "tenant__name"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "period_start"], name="invoice_tenant_period_unique"),
            models.CheckConstraint(condition=Q(status="draft") | Q(issued_at__isnull=False),
                                   name="invoice_issued_has_date"),
        ]

    def __str__(self) -> str:
        return f"{self.number} ({self.get_status_display()})"

    def save(self, *args, **kwargs):
        if not self._state.adding and self._issued_in_db():
            raise ImmutableError(f"invoice {self.number} is issued and cannot be changed")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        if self._issued_in_db():
            raise ImmutableError(f"invoice {self.number} is issued and cannot be deleted")
        return super().delete(*args, **kwargs)

    @property
    def is_issued(self) -> bool:
        return self.status == InvoiceStatus.ISSUED

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def _issued_in_db(self) -> bool:
        return Invoice.objects.filter(pk=self.pk, status=InvoiceStatus.ISSUED).exists()


class LineKind(models.TextChoices):
    USAGE = "usage", "Usage"
    COMMITMENT = "commitment", "Minimum commitment top-up"
    CREDIT = "credit", "SLA credit"


class InvoiceLineQuerySet(models.QuerySet):
    def _touches_issued(self) -> bool:
        return self.filter(invoice__status=InvoiceStatus.ISSUED).exists()

    def update(self, **kwargs):
        if self._touches_issued():
            raise ImmutableError("lines of issued invoices cannot be changed")
        return super().update(**kwargs)

    def delete(self):
        if self._touches_issued():
            raise ImmutableError("lines of issued invoices cannot be deleted")
        return super().delete()


class InvoiceLine(models.Model):
    invoice = models.ForeignKey(Invoice, on_delete=models.CASCADE, related_name="lines")
    position = models.PositiveIntegerField()
    kind = models.CharField(max_length=12, choices=LineKind.choices)
    description = models.CharField(max_length=300)
    model_name = models.CharField(max_length=200, blank=True)
    price = models.ForeignKey(ModelPrice, on_delete=models.PROTECT, null=True, blank=True, related_name="+",
                              help_text="The price version applied (usage lines); null when none was in force")
    input_tokens = models.BigIntegerField(default=0)
    output_tokens = models.BigIntegerField(default=0)
    input_per_mtok = models.DecimalField(max_digits=12, decimal_places=6, null=True, blank=True)
    output_per_mtok = models.DecimalField(max_digits=12, decimal_places=6, null=True, blank=True)
    sli = models.CharField(max_length=16, blank=True, help_text="The missed objective (credit lines)")
    amount = models.DecimalField(max_digits=16, decimal_places=2)

    objects = InvoiceLineQuerySet.as_manager()

    class Meta:
        ordering = ["invoice", "position"]
        constraints = [models.UniqueConstraint(fields=["invoice", "position"], name="invoiceline_position_unique")]

    def __str__(self) -> str:
        return f"{self.invoice.number} #{self.position}: {self.description}"

    def save(self, *args, **kwargs):
        if self._parent_issued():
            raise ImmutableError("lines of issued invoices cannot be changed")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        if self._parent_issued():
            raise ImmutableError("lines of issued invoices cannot be deleted")
        return super().delete(*args, **kwargs)

    def _parent_issued(self) -> bool:
        return Invoice.objects.filter(pk=self.invoice_id, status=InvoiceStatus.ISSUED).exists()
