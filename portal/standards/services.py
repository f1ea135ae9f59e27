from datetime import datetime

from django.utils import timezone

from portal.accounts.models import User
from portal.standards.models import Baseline


def baseline_set(
    *, by: User | None, driver_version: str = "", cuda_driver_version: str = "", vllm_version: str = "",
    tgi_version: str = "", triton_version: str = "", sglang_version: str = "", note: str = "",
    now: datetime | None = None,
) -> Baseline:
    """Put a new baseline in force. Earlier ones stay as history."""
    return Baseline.objects.create(
        driver_version=driver_version, cuda_driver_version=cuda_driver_version, vllm_version=vllm_version,
        tgi_version=tgi_version, triton_version=triton_version, sglang_version=sglang_version, note=note,
        created_at=now or timezone.now(), created_by=by,
    )
