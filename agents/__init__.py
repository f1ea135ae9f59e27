"""Tokenmill node agent: collects NVML and inference-engine telemetry and ships it to the portal.

Runs on GPU nodes with only the standard library, nvidia-ml-py and prometheus-client: it must never import Django,
pydantic or anything under ``portal``.
"""

__version__ = "0.1.0"
