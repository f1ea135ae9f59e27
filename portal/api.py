from ninja import NinjaAPI

from portal.telemetry.api import router as agent_router
from portal.tenants.api import router as tenant_router

api = NinjaAPI(
    title="Tokenmill API",
    version="1",
    description="Agent ingest contract (schema version 1) and the tenant API (Bearer API key from the tenant portal).",
    urls_namespace="api",
)
api.add_router("/", agent_router)
api.add_router("/", tenant_router)
