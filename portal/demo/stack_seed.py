"""The demo's certified stack: the version certified last quarter, the one in force ("2026.12": driver 590, CUDA
13.1, the engine versions the simulated agents report, TensorRT-LLM pinned though no agent reports it yet) and
the placement policy, on, so the nodes off the stack (the two that lag on driver 550 and the Dynamo pilot's
uncertified server) take no new placements. Called from seed_demo inside its transaction, after every allocation
the demo makes, so the policy only governs what comes after."""

from datetime import datetime, timedelta

from agents.simulate import VERSIONS
from portal.accounts.models import User
from portal.standards.services import baseline_set, placement_policy_set

STACK_IN_FORCE = "2026.12"


def seed_stack(*, operator: User, now: datetime) -> None:
    baseline_set(by=operator, name="2026.09", driver_version="580.95.05", cuda_driver_version="13.0",
                 vllm_version="0.9.2", sglang_version="0.4.9", triton_version="2.58.0", tgi_version="3.3.2",
                 note="Q3 fleet standard", now=now - timedelta(days=75))
    baseline_set(by=operator, name=STACK_IN_FORCE, driver_version="590.48.01", cuda_driver_version="13.1",
                 tensorrt_llm_version="1.0.0", note="CHG-2291 Q4 fleet standard: driver 590, vLLM 0.10.1",
                 now=now - timedelta(days=20), **{f"{engine}_version": version for engine, version in VERSIONS.items()})
    placement_policy_set(by=operator, exclude_off_stack=True, note="CHG-2304: new tenants only on certified nodes",
                         now=now - timedelta(days=6))
