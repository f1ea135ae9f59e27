"""The demo's isolation report: confidential-computing mode on every GPU, and one MIG GPU three tenants share.

CC mode follows the simulated NVML's rule (agents.simulate.simulated_cc_on), so the seeded Gpu.cc_mode is what
each node's simulated agent reports from its first batch. The shared GPU is GPU 3 of iad1-h100-10 (MIG layout
2g.20gb GI 3, 4, 5 and 1g.10gb GI 13), free until here: Acme AI, Globex Research and Umbrella Health each serve a
small model on one of its instances from the start of the history, and GI 5 stays free. Called before the history
is written, so the shared GPU's power and every deployment's usage are in it.
"""

from datetime import datetime

from agents.simulate import VERSIONS, simulated_cc_on
from portal.accounts.models import User
from portal.capacity.services import allocation_create, deployment_create
from portal.demo.history import SIM_SEED
from portal.fleet.models import Gpu, MigInstance, Node, ServingEndpoint
from portal.tenants.models import Tenant

SHARED_NODE, SHARED_GPU = "iad1-h100-10", 3
# tenant slug, GPU instance id, model, engine, metrics port, settings, output tokens/s per whole GPU at full load
SHARED_UNITS = (
    ("acme", 3, "meta-llama/Llama-3.1-8B-Instruct", "vllm", 8100,
     {"precision": "fp8", "kv_cache_dtype": "fp8_e4m3"}, 2400),
    ("globex", 4, "mistralai/Mistral-7B-Instruct-v0.3", "tgi", 8180, {"precision": "bf16"}, 2100),
    ("umbrella", 13, "mistralai/Mistral-7B-Instruct-v0.3", "tgi", 8181, {"precision": "int4-awq"}, 2100),
)


def seed_isolation(*, nodes: list[Node], tenants: dict[str, Tenant], by: User, since: datetime,
                   capacity: dict[tuple[int, str], float]) -> None:
    """Sets each GPU's CC mode, and shares the MIG GPU among three tenants' deployments (their capacity at full
    load added to `capacity`, which the history and the simulated agents run)."""
    for node in nodes:
        mig = Gpu.objects.filter(node=node, mig_mode=True).exists()
        on = simulated_cc_on(seed=SIM_SEED, hostname=node.hostname, gpu_model=node.model_key, mig=mig)
        Gpu.objects.filter(node=node).update(cc_mode="on" if on else "off")
    node = next(n for n in nodes if n.hostname == SHARED_NODE)
    gpu = Gpu.objects.get(node=node, index=SHARED_GPU)
    for slug, gi, model, engine, port, settings, tps in SHARED_UNITS:
        mig = MigInstance.objects.get(gpu=gpu, gi_id=gi)
        url = f"http://127.0.0.1:{port}/metrics"
        ServingEndpoint.objects.create(node=node, url=url, model=model, engine=engine, up=True,
                                       probe_latency_ms=2.5, version=VERSIONS[engine])
        allocation = allocation_create(tenant=tenants[slug], gpu=gpu, mig_instance=mig, starts_at=since, by=by)
        deployment_create(tenant=tenants[slug], name=f"{model.split('/')[-1]} on {node.hostname} MIG {mig.profile}",
                          model_name=model, engine=engine, node=node, metrics_url=url, allocations=[allocation],
                          settings=settings, active_from=since)
        capacity[(node.pk, url)] = tps * float(allocation.share)
