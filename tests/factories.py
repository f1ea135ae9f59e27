import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal

import factory

from portal.accounts.models import OperatorRole, User
from portal.fleet.models import Gpu, Node, NodeStatus, Site
from portal.fleet.services import node_credential_issue
from portal.tenants.models import MemberRole, Membership, Tenant, TenantStatus

PASSWORD = "correct-horse-battery"


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = User
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda o: f"{o.username}@example.com")
    password = factory.PostGenerationMethodCall("set_password", PASSWORD)

    @factory.post_generation
    def saved(obj, create, extracted, **kwargs):
        if create:
            obj.save()


class OperatorFactory(UserFactory):
    operator_role = OperatorRole.ADMIN


class ViewerFactory(UserFactory):
    operator_role = OperatorRole.VIEWER


class TenantFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Tenant

    name = factory.Sequence(lambda n: f"Tenant {n}")
    slug = factory.Sequence(lambda n: f"tenant-{n}")
    status = TenantStatus.ACTIVE


class MembershipFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Membership

    user = factory.SubFactory(UserFactory)
    tenant = factory.SubFactory(TenantFactory)
    role = MemberRole.ADMIN


class SiteFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Site

    name = factory.Sequence(lambda n: f"Site {n}")
    slug = factory.Sequence(lambda n: f"site-{n}")
    gpu_capex = Decimal("30000.00")
    depreciation_months = 48
    energy_price_kwh = Decimal("0.1200")
    pue = Decimal("1.30")
    other_opex_gpu_hour = Decimal("0.2500")


# Nodes and GPUs of the tests are on the books long before any hour a test measures.
BOOKS_SINCE = datetime(2020, 1, 1, tzinfo=UTC)


class NodeFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Node

    site = factory.SubFactory(SiteFactory)
    hostname = factory.Sequence(lambda n: f"gpu-node-{n:02d}")
    status = NodeStatus.ONLINE
    installed_at = BOOKS_SINCE


class GpuFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Gpu

    node = factory.SubFactory(NodeFactory)
    uuid = factory.LazyFunction(lambda: gpu_uuid())
    index = factory.Sequence(lambda n: n % 8)
    name = "NVIDIA H100 80GB HBM3"
    installed_at = BOOKS_SINCE


def admin_of(tenant: Tenant, **kwargs) -> User:
    return MembershipFactory(tenant=tenant, role=MemberRole.ADMIN, **kwargs).user


def node_with_credential(**kwargs) -> tuple[Node, str]:
    node = NodeFactory(**kwargs)
    return node, node_credential_issue(node=node)


def gpu_uuid() -> str:
    return f"GPU-{uuid.uuid4()}"


def gpu_payload(*, uuid: str, index: int = 0, util: float = 50.0, power: float = 400.0, **extra) -> dict:
    return {
        "uuid": uuid, "index": index, "name": "NVIDIA H100 80GB HBM3",
        "pci_bus_id": f"00000000:{index + 0x18:02X}:00.0",
        "samples": 10, "util_mean": util, "util_max": min(100.0, util + 5), "mem_util_mean": util / 2,
        "memory_used_mib": 40000, "memory_total_mib": 81559, "power_mean_w": power, "power_limit_w": 700.0,
        "energy_mj": int(power * 10 * 1000), "temp_max_c": 61.0, "sm_clock_mhz": 1980, "mem_clock_mhz": 2619,
        **extra,
    }


def engine_payload(*, endpoint: str = "http://127.0.0.1:8000/metrics", model: str = "meta-llama/Llama-3.1-8B-Instruct",
                   prompt: int = 1000, generation: int = 250, **extra) -> dict:
    return {
        "endpoint": endpoint, "engine": "vllm", "model": model, "up": True, "probe_latency_ms": 3.5,
        "version": "0.6.3", "prompt_tokens": prompt, "generation_tokens": generation, "requests_ok": 5,
        "requests_failed": 0, "running": 3.0, "waiting": 0.0, "kv_cache_usage": 0.4,
        "ttft": {"le": [0.1, 0.25, 0.5, 1.0], "counts": [1, 3, 4, 5, 5], "sum": 1.2},
        **extra,
    }


def batch_payload(*, seq: int, gpus: list[dict] | None = None, engines: list[dict] | None = None,
                  end: float | None = None, interval: float = 10.0, **extra) -> dict:
    end = end if end is not None else time.time()
    return {
        "schema_version": 1, "seq": seq, "interval_start": end - interval, "interval_end": end,
        "host": {"hostname": "gpu-node", "driver_version": "550.54.15", "cuda_driver_version": "12.4",
                 "nvml_version": "12.550.54.15", "agent_version": "0.1.0", "os": "Ubuntu 22.04", "simulated": False},
        "gpus": gpus if gpus is not None else [], "engines": engines if engines is not None else [], "events": [],
        **extra,
    }
