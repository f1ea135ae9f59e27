from ninja import NinjaAPI

from portal.telemetry.api import BODY_SCHEMAS
from portal.telemetry.api import router as agent_router
from portal.tenants.api import router as tenant_router


class TokenmillApi(NinjaAPI):
    def get_openapi_schema(self, *args, **kwargs):
        """Ninja's document, plus the schemas of the request bodies the agent routes validate themselves (and
        everything they reference), as components, so every $ref resolves from the document's root."""
        schema = super().get_openapi_schema(*args, **kwargs)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in BODY_SCHEMAS:
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            components[model.__name__] = body
        return schema


api = TokenmillApi(
    title="Tokenmill API",
    version="1",
    description="Agent ingest contract (schema version 1) and the tenant API (Bearer API key from the tenant portal).",
    urls_namespace="api",
)
api.add_router("/", agent_router)
api.add_router("/", tenant_router)
