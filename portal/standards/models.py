from django.conf import settings
from django.core.validators import RegexValidator
from django.db import models

from portal.fleet.models import ScrapeTarget

dotted_version = RegexValidator(
    r"^\d+(\.\d+)*$", "Enter a dotted numeric version such as 590.48.01 (digits and dots only)."
)

# Baseline field of each serving engine, as ServingEndpoint.engine names it.
ENGINE_FIELDS = {
    ScrapeTarget.Engine.VLLM: "vllm_version",
    ScrapeTarget.Engine.TGI: "tgi_version",
    ScrapeTarget.Engine.TRITON: "triton_version",
    ScrapeTarget.Engine.SGLANG: "sglang_version",
}


class Baseline(models.Model):
    """The software versions the fleet should run. Never edited: each change is a new row, the newest in force.
    A blank version is not checked."""

    driver_version = models.CharField("NVIDIA driver", max_length=32, blank=True, validators=[dotted_version])
    cuda_driver_version = models.CharField("CUDA (driver API)", max_length=32, blank=True,
                                           validators=[dotted_version])
    vllm_version = models.CharField("vLLM", max_length=64, blank=True, validators=[dotted_version])
    tgi_version = models.CharField("TGI", max_length=64, blank=True, validators=[dotted_version])
    triton_version = models.CharField("Triton / TensorRT-LLM", max_length=64, blank=True,
                                      validators=[dotted_version])
    sglang_version = models.CharField("SGLang", max_length=64, blank=True, validators=[dotted_version])
    note = models.CharField(max_length=200, blank=True, help_text="Why it changed, e.g. a ticket")
    created_at = models.DateTimeField()
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )

    class Meta:
        ordering = ["-created_at", "-pk"]
        get_latest_by = ["created_at", "pk"]

    def __str__(self) -> str:
        return f"Baseline of {self.created_at:%Y-%m-%d %H:%M}"

    def engine_version(self, engine: str) -> str:
        return getattr(self, ENGINE_FIELDS[engine]) if engine in ENGINE_FIELDS else ""
