from dataclasses import dataclass

from django.conf import settings
from django.core.validators import RegexValidator
from django.db import models

from portal.fleet.models import ScrapeTarget

dotted_version = RegexValidator(
    r"^\d+(\.\d+)*$", "Enter a dotted numeric version such as 590.48.01 (digits and dots only)."
)
stack_name = RegexValidator(
    r"^[0-9A-Za-z][0-9A-Za-z._-]*$", "Enter a version name such as 2026.12 (letters, digits, dots, - and _)."
)


@dataclass(frozen=True)
class Component:
    """One pinned component of the stack and where a node's version of it is read.

    source "node": a host fact on fleet.Node (attr names it); "engine": ServingEndpoint.version of the endpoints
    of `engine`; "setting": ServingEndpoint.settings[attr] of the endpoints of `engine`, a key no agent fills
    today, so the version shows as not reported until one does (see docs/certified-stack.md)."""

    field: str
    label: str
    source: str
    attr: str = ""
    engine: str = ""


COMPONENTS = (
    Component("driver_version", "Driver", "node", attr="driver_version"),
    Component("cuda_driver_version", "CUDA (driver)", "node", attr="cuda_driver_version"),
    Component("vllm_version", "vLLM", "engine", engine=ScrapeTarget.Engine.VLLM),
    Component("sglang_version", "SGLang", "engine", engine=ScrapeTarget.Engine.SGLANG),
    Component("triton_version", "Triton", "engine", engine=ScrapeTarget.Engine.TRITON),
    Component("tgi_version", "TGI", "engine", engine=ScrapeTarget.Engine.TGI),
    # TensorRT-LLM and NeMo models are served through Triton (the TensorRT-LLM backend, NeMo's Triton export).
    Component("tensorrt_llm_version", "TensorRT-LLM", "setting", attr="tensorrt_llm_version",
              engine=ScrapeTarget.Engine.TRITON),
    Component("nemo_version", "NeMo", "setting", attr="nemo_version", engine=ScrapeTarget.Engine.TRITON),
)
VERSION_FIELDS = [c.field for c in COMPONENTS]


class CertifiedStack(models.Model):
    """A named version of the software every node should run (e.g. "2026.12"). Never edited: each change is a
    new row, the newest in force. A blank version is not checked."""

    name = models.CharField("Stack version", max_length=32, unique=True, validators=[stack_name],
                            help_text="The name operators use for this stack, e.g. 2026.12")
    driver_version = models.CharField("NVIDIA driver", max_length=32, blank=True, validators=[dotted_version])
    cuda_driver_version = models.CharField("CUDA (driver API)", max_length=32, blank=True,
                                           validators=[dotted_version])
    tensorrt_llm_version = models.CharField("TensorRT-LLM", max_length=64, blank=True, validators=[dotted_version])
    vllm_version = models.CharField("vLLM", max_length=64, blank=True, validators=[dotted_version])
    sglang_version = models.CharField("SGLang", max_length=64, blank=True, validators=[dotted_version])
    triton_version = models.CharField("Triton", max_length=64, blank=True, validators=[dotted_version])
    tgi_version = models.CharField("TGI", max_length=64, blank=True, validators=[dotted_version])
    nemo_version = models.CharField("NeMo", max_length=64, blank=True, validators=[dotted_version])
    note = models.CharField(max_length=200, blank=True, help_text="Why it changed, e.g. a ticket")
    created_at = models.DateTimeField()
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )

    class Meta:
        ordering = ["-created_at", "-pk"]
        get_latest_by = ["created_at", "pk"]

    def __str__(self) -> str:
        return f"Certified stack {self.name}"

    def pinned(self) -> list[tuple[Component, str]]:
        """Every component with its pinned version ("" where not checked), in COMPONENTS' order."""
        return [(c, getattr(self, c.field)) for c in COMPONENTS]


class PlacementPolicy(models.Model):
    """Whether nodes off the certified stack are kept out of new placements. Never edited: each change is a new
    row, the newest in force; with none, nothing is excluded. Existing allocations are never touched."""

    exclude_off_stack = models.BooleanField(
        "Exclude nodes off the certified stack from new placements", default=False)
    note = models.CharField(max_length=200, blank=True, help_text="Why it changed, e.g. a ticket")
    created_at = models.DateTimeField()
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )

    class Meta:
        ordering = ["-created_at", "-pk"]
        verbose_name_plural = "placement policies"

    def __str__(self) -> str:
        verdict = "excludes" if self.exclude_off_stack else "allows"
        return f"Placement policy of {self.created_at:%Y-%m-%d %H:%M}: {verdict} nodes off the stack"
