"""The node agent against the real portal (gunicorn, the test database): engines as deployed, scraped from real
captures on loopback, sent by the agent's own spool and sender, stored, checked and billed."""

import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from portal.alerts.models import Alert
from portal.capacity.selectors import usage_for_tenant
from portal.capacity.services import allocation_create, deployment_create, deployments_check_billable
from portal.fleet.models import Gpu, Node, ServingEndpoint
from portal.telemetry.rollups import rollup_minutes
from portal.telemetry.store import batches_store
from tests import FIXTURES
from tests.factories import PASSWORD, OperatorFactory, TenantFactory, node_with_credential
from tests.worker import gunicorn_server

sys.path.insert(0, str(Path(__file__).resolve().parent / "agent"))
from agentkit import MetricsServer
from fakenvml import FakeGpu, FakeNvml

from agents.config import Config, Target
from agents.daemon import Agent
from agents.sender import Sender
from agents.spool import Spool

pytestmark = pytest.mark.django_db(transaction=True)

ENSEMBLE = (FIXTURES / "added/triton_trtllm_ensemble_counts_tensorrtllm_backend_issue49_EXCERPT.txt").read_text()
RAY = (FIXTURES / "added/datadog_ray_vllm_metrics_fixture.txt").read_text()
DYNAMO_TRTLLM = (FIXTURES / "added/dynamo_docs_metrics_example_trtllm_worker.txt").read_text()
ENSEMBLE_CONFIGS = {
    "/v2": {"name": "triton", "version": "2.40.0"},
    "/v2/models/ensemble/config": {"name": "ensemble", "platform": "ensemble", "ensemble_scheduling": {"step": [
        {"model_name": "preprocessing"}, {"model_name": "tensorrt_llm"}, {"model_name": "postprocessing"}]}},
    **{f"/v2/models/{m}/config": {"name": m, "backend": "python"}
       for m in ("preprocessing", "tensorrt_llm", "postprocessing")},
}


class Factory:
    """A node whose real agent code (collector, deltas, spool, sender) reports to the portal under test."""

    def __init__(self, tmp_path: Path, portal_url: str, target: Target):
        self.node, credential = node_with_credential(hostname="gpu-e2e-01")
        self.gpu_uuid = "GPU-6a5d4f0e-1234-5678-9abc-def012345678"
        state = tmp_path / "agent"
        state.mkdir()
        (state / "credential").write_text(credential)
        self.cfg = Config(portal_url=portal_url, state_dir=state, hostname=self.node.hostname, targets=(target,),
                          interval_s=10, backoff_base_s=0.1, backoff_max_s=0.2)
        self.spool = Spool(self.cfg.spool_path)
        self.agent = Agent(self.cfg, nvml=FakeNvml([FakeGpu(0, uuid=self.gpu_uuid)]))
        self.sender = Sender(spool_path=self.cfg.spool_path, portal_url=portal_url,
                             credential_path=self.cfg.credential_path, timeout_s=10, send_period_s=0.0)

    def interval(self) -> None:
        """One agent interval ending now: sample, close, spool, send everything."""
        self.agent.sample()
        end = time.time()
        batch, updates, sim = self.agent.build_batch(end - 10, end)
        self.spool.append(batch, {**updates, **sim})
        self.agent.commit(updates, sim)
        for _ in range(20):
            if self.sender.step(self.spool) is None:
                break
        assert self.spool.stats()["spool_depth"] == 0, self.spool.stats()

    def close(self) -> None:
        self.agent.close()
        self.spool.close()


def deploy(node: Node, gpu_uuid: str, *, url: str, engine: str, model: str):
    tenant = TenantFactory()
    gpu = Gpu.objects.get(uuid=gpu_uuid)  # on the books from its first reported interval
    allocation = allocation_create(tenant=tenant, gpu=gpu, starts_at=gpu.installed_at)
    # Usage is owned by the minute: live from the minute the GPU appeared in.
    deployment = deployment_create(tenant=tenant, name=f"{model}-prod", model_name=model, engine=engine, node=node,
                                   metrics_url=url, allocations=[allocation],
                                   active_from=gpu.installed_at.replace(second=0, microsecond=0))
    return tenant, deployment


def usage(tenant):
    rollup_minutes(now=timezone.now() + timedelta(seconds=6))
    now = timezone.now()
    return {line.model: line for line in usage_for_tenant(tenant=tenant, start=now - timedelta(hours=2),
                                                           end=now + timedelta(minutes=2), by_day=False)}


def test_a_triton_ensembles_requests_are_billed_once_in_the_tenants_usage(tmp_path):
    counts = {"n": 59}
    srv = MetricsServer(lambda: ENSEMBLE.replace(" 59\n", f" {counts['n']}\n"), pages=ENSEMBLE_CONFIGS)
    with gunicorn_server(workers=1) as (base, _access):
        factory = Factory(tmp_path, base, Target(srv.url, "triton"))
        try:
            factory.interval()  # the first scrape: the baseline (served before the agent saw it)
            batches_store()
            tenant, _deployment = deploy(factory.node, factory.gpu_uuid, url=srv.url, engine="triton",
                                         model="ensemble")
            counts["n"] = 59 + 41  # 41 client requests through the pipeline
            factory.interval()
            batches_store()
        finally:
            factory.close()
            srv.stop()
    assert set(ServingEndpoint.objects.values_list("model", flat=True)) == {"ensemble"}
    assert usage(tenant)["ensemble"].requests_ok == 41  # not 41 x 3 (each composing step counts it too)


def test_vllm_under_ray_serve_is_billed(tmp_path):
    tokens = {"prompt": 58.0, "generation": 300.0}

    def render():
        return (RAY.replace("} 58.0\n", f"}} {tokens['prompt']}\n", 1)
                .replace("} 300.0\n", f"}} {tokens['generation']}\n", 1))

    srv = MetricsServer(render)
    model = "neuralmagic/Meta-Llama-3.1-70B-Instruct-FP8"
    with gunicorn_server(workers=1) as (base, _access):
        factory = Factory(tmp_path, base, Target(srv.url, "vllm"))
        try:
            factory.interval()
            batches_store()
            tenant, _deployment = deploy(factory.node, factory.gpu_uuid, url=srv.url, engine="vllm", model=model)
            tokens.update(prompt=58.0 + 1200, generation=300.0 + 450)
            factory.interval()
            batches_store()
        finally:
            factory.close()
            srv.stop()
    line = usage(tenant)[model]
    assert (line.prompt_tokens, line.generation_tokens) == (1200, 450)
    assert ServingEndpoint.objects.get(model=model).token_families == [
        "ray_vllm:generation_tokens_total", "ray_vllm:prompt_tokens_total"]
    assert deployments_check_billable() == []


def test_an_endpoint_without_token_counters_alerts_on_its_deployment_end_to_end(tmp_path, client):
    # Dynamo's TensorRT-LLM worker answers with requests and latency but no token counter: every light green,
    # nothing billable. The agent says so in its batch, the portal marks the endpoint, the check alerts.
    srv = MetricsServer(lambda: DYNAMO_TRTLLM)
    with gunicorn_server(workers=1) as (base, _access):
        factory = Factory(tmp_path, base, Target(srv.url, "triton", "Qwen/Qwen3-0.6B"))
        try:
            factory.interval()
            batches_store()
            _tenant, deployment = deploy(factory.node, factory.gpu_uuid, url=srv.url, engine="triton",
                                         model="Qwen/Qwen3-0.6B")
            factory.interval()
            batches_store()
            assert factory.spool.stats()["quarantined"] == 0
        finally:
            factory.close()
            srv.stop()
    endpoint = ServingEndpoint.objects.get()
    assert endpoint.up and endpoint.token_families == [] and endpoint.unbillable_since is not None
    assert deployments_check_billable() == [deployment.pk]
    alert = Alert.objects.get(kind="unbillable_endpoint", resolved_at__isnull=True)
    assert deployment.name in alert.title and "no token counters" in alert.title and alert.severity == "critical"
    client.login(username=OperatorFactory().username, password=PASSWORD)
    assert f'data-testid="unbillable-{deployment.pk}"' in client.get("/capacity/deployments/").content.decode()
    node_page = client.get(f"/fleet/nodes/{factory.node.pk}/").content.decode()
    assert "unbillable" in node_page and "no token counters since" in node_page
    # The engine exports its token counters again: the endpoint is billable, the alert resolves.
    ServingEndpoint.objects.update(unbillable_since=None, token_families=["trtllm_prompt_tokens_total"])
    assert deployments_check_billable() == []
    alert.refresh_from_db()
    assert alert.resolved_at is not None
