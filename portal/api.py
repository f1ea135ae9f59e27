from ninja import NinjaAPI

from portal.telemetry.api import router as agent_router

api = NinjaAPI(
    title="Tokenmill API",
    version="1",
    description="Agent ingest contract (schema version 1) and, as they come, the tenant API.",
    urls_namespace="api",
)
api.add_router("/", agent_router)
