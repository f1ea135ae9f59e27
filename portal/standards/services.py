from datetime import datetime

from django.db import transaction
from django.utils import timezone

from portal.accounts.models import User
from portal.audit.services import audit_record
from portal.standards.models import VERSION_FIELDS, CertifiedStack, PlacementPolicy
from portal.standards.selectors import current_baseline, placement_policy


def baseline_set(
    *, by: User | None, name: str, driver_version: str = "", cuda_driver_version: str = "",
    tensorrt_llm_version: str = "", vllm_version: str = "", sglang_version: str = "", triton_version: str = "",
    tgi_version: str = "", nemo_version: str = "", note: str = "", now: datetime | None = None,
) -> CertifiedStack:
    """Put a new certified stack version in force, audited with the one it replaces. Earlier ones stay as
    history; a version name is never reused (the database refuses a second row of one name)."""
    pins = {"driver_version": driver_version, "cuda_driver_version": cuda_driver_version,
            "tensorrt_llm_version": tensorrt_llm_version, "vllm_version": vllm_version,
            "sglang_version": sglang_version, "triton_version": triton_version, "tgi_version": tgi_version,
            "nemo_version": nemo_version}
    with transaction.atomic():
        before = current_baseline()
        stack = CertifiedStack.objects.create(name=name, note=note, created_at=now or timezone.now(), created_by=by,
                                              **pins)
        audit_record(actor=by, action="standards.stack_set", target=stack,
                     before=_stack_state(before) if before else None, after=_stack_state(stack))
    return stack


def _stack_state(stack: CertifiedStack) -> dict:
    return {"name": stack.name, **{name: getattr(stack, name) for name in VERSION_FIELDS}, "note": stack.note}


def placement_policy_set(*, by: User | None, exclude_off_stack: bool, note: str = "",
                         now: datetime | None = None) -> PlacementPolicy:
    """Put a placement policy in force, audited with the one it replaces (none set reads as not excluding). It
    governs new placements only: allocations already made are never ended or moved by it."""
    with transaction.atomic():
        before = placement_policy()
        policy = PlacementPolicy.objects.create(exclude_off_stack=exclude_off_stack, note=note,
                                                created_at=now or timezone.now(), created_by=by)
        audit_record(actor=by, action="standards.placement_policy_set", target="placement policy",
                     before={"exclude_off_stack": before.exclude_off_stack if before else False},
                     after={"exclude_off_stack": exclude_off_stack, "note": note})
    return policy
