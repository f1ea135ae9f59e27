"""Agent endpoints: enroll and ingest. Thin: parse, authenticate, call a service, answer."""

import functools
import zlib

import pydantic_core
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, JsonResponse
from django.utils import timezone
from ninja import Router, Status
from ninja.security import HttpBearer
from pydantic import ValidationError

from portal.fleet.models import Node, ScrapeTarget
from portal.fleet.services import EnrollmentError, credential_authenticate, node_enroll
from portal.ratelimit import cache_count
from portal.telemetry.schemas import (
    AgentConfigOut,
    BatchesEnvelopeIn,
    BatchesIn,
    BatchesOut,
    BatchIn,
    EnrollIn,
    EnrollOut,
    ErrorOut,
    IngestOut,
    SeqConflictOut,
)
from portal.telemetry.services import IngestRejected, IngestResult, SeqConflict, batch_accept, batches_accept

router = Router(tags=["agent"])


class NodeBearer(HttpBearer):
    def authenticate(self, request: HttpRequest, token: str):
        return credential_authenticate(value=token)


def agent_config(node: Node) -> dict:
    """The node's desired agent config, as JSON-ready data (callers must not change it)."""
    return _agent_config(node.pk, node.config_version, node.interval_s, node.sample_s)


@functools.lru_cache(maxsize=65_536)
def _agent_config(node_id: int, config_version: int, interval_s: int, sample_s: float) -> dict:
    """Cached in the process by config version: every change of targets or intervals bumps it
    (node_set_scrape_targets), and the node row is read fresh with the credential on each request, so a change
    is seen by the next request in every process, without a cache round trip per request."""
    targets = ScrapeTarget.objects.filter(node_id=node_id).order_by("url").values("url", "engine", "model")
    return AgentConfigOut(
        config_version=config_version,
        interval_s=interval_s,
        sample_s=sample_s,
        targets=[{**t, "model": t["model"] or None} for t in targets],
    ).model_dump()


class BodyError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def _read_body(request: HttpRequest) -> bytes:
    """The request body, gunzipped when sent with Content-Encoding: gzip, within the configured size limits. A
    chunked body (no Content-Length, which proxies and HTTP clients send) is read from the server's de-chunked
    stream, as far as the limit and one byte more."""
    limit = settings.INGEST_MAX_BODY_BYTES
    try:
        declared = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise BodyError(400, "Content-Length is not a number") from None
    if declared > limit:
        raise BodyError(413, f"body exceeds {limit} bytes")
    if not declared and "chunked" in request.META.get("HTTP_TRANSFER_ENCODING", "").lower():
        body = request.META["wsgi.input"].read(limit + 1)
    else:
        try:
            body = request.body
        except RequestDataTooBig:
            raise BodyError(413, f"body exceeds {limit} bytes") from None
    if len(body) > limit:
        raise BodyError(413, f"body exceeds {limit} bytes")
    if request.headers.get("Content-Encoding", "").lower() == "gzip":
        body = _gunzip(body, limit=8 * limit)
    return body


def _gunzip(body: bytes, *, limit: int) -> bytes:
    """One gzip member, checked to its end (CRC and length trailer). Bounded: a small gzip bomb must not become a
    large allocation."""
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, limit)
    except zlib.error:
        raise BodyError(400, "body is not valid gzip") from None
    if inflater.unconsumed_tail:
        raise BodyError(413, f"decompressed body exceeds {limit} bytes")
    if not inflater.eof:
        raise BodyError(400, "gzip body is truncated (no end of stream or trailer)")
    if inflater.unused_data:
        raise BodyError(400, "gzip body has data after its end")
    return out


def _validation_detail(exc: ValidationError, *loc) -> list[dict]:
    return [
        {"loc": ["body", *loc, *err["loc"]], "msg": err["msg"], "type": err["type"]}
        for err in exc.errors(include_url=False, include_input=False)
    ]


# The request bodies are read and validated by the views themselves (see BatchIn); the published document
# references their schemas, which portal.api places among the document's components.
BODY_SCHEMAS = (BatchIn, BatchesIn, EnrollIn)


def _request_body_schema(schema: type) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{schema.__name__}"}}}}}


@router.post(
    "/agent/enroll",
    response={200: EnrollOut, 400: ErrorOut, 403: ErrorOut, 413: ErrorOut, 422: ErrorOut},
    summary="Trade a one-time enrollment token for a node credential",
    openapi_extra=_request_body_schema(EnrollIn),
)
def enroll(request: HttpRequest):
    try:
        payload = EnrollIn.model_validate_json(_read_body(request))
    except BodyError as exc:
        return Status(exc.status, {"detail": exc.detail})
    except ValidationError as exc:
        return Status(422, {"detail": _validation_detail(exc)})
    try:
        enrolled = node_enroll(token_value=payload.token, host=payload.host.model_dump())
    except EnrollmentError as exc:
        return Status(403, {"detail": str(exc)})
    return Status(200, {
        "node_id": enrolled.node.pk, "credential": enrolled.credential, "config": agent_config(enrolled.node),
    })


@router.post(
    "/agent/ingest",
    auth=NodeBearer(),
    response={
        200: IngestOut, 400: ErrorOut, 401: ErrorOut, 409: SeqConflictOut, 413: ErrorOut, 422: ErrorOut, 429: ErrorOut,
    },
    summary="Store one batch of node telemetry (idempotent per node and seq)",
    description=("A 200 means the batch is durably stored and will not be asked for again; its readings reach the "
                 "dashboards when the store worker has written them into the telemetry tiers (well under a second "
                 "at normal load)."),
    openapi_extra=_request_body_schema(BatchIn),
)
def ingest(request: HttpRequest):
    credential = request.auth
    if (limited := _rate_limited(credential.node_id)) is not None:
        return limited
    try:
        batch = BatchIn.model_validate_json(_read_body(request))
        result = batch_accept(credential=credential, batch=batch)
    except BodyError as exc:
        return Status(exc.status, {"detail": exc.detail})
    except ValidationError as exc:
        return Status(422, {"detail": _validation_detail(exc)})
    except IngestRejected as exc:
        return Status(422, {"detail": [{"loc": ["body", *exc.loc], "msg": exc.msg, "type": "value_error"}]})
    except SeqConflict as exc:
        return Status(409, {"detail": str(exc), "last_seq": exc.last_seq})
    # Written directly: IngestOut documents it, and our own reply needs none of the validation ninja would run on
    # it in every request.
    return JsonResponse({"seq": result.seq, "status": result.status, "config": agent_config(credential.node)})


@router.post(
    "/agent/batches",
    auth=NodeBearer(),
    response={200: BatchesOut, 400: ErrorOut, 401: ErrorOut, 413: ErrorOut, 422: ErrorOut, 429: ErrorOut},
    summary="Store several intervals of node telemetry, each on its own (idempotent per node and seq)",
    description=("A 200 answers every interval in the order sent: stored or duplicate means durably held (do "
                 "not send it again); conflict means its seq holds other content (last_seq names the node's "
                 "highest); rejected means it can never be stored (detail names the field). A 4xx refuses the "
                 "request as a whole (its envelope, size, credential or rate) and stores none of it."),
    openapi_extra=_request_body_schema(BatchesIn),
)
def ingest_batches(request: HttpRequest):
    credential = request.auth
    if (limited := _rate_limited(credential.node_id)) is not None:
        return limited
    try:
        envelope = BatchesEnvelopeIn.model_validate(pydantic_core.from_json(_read_body(request)))
    except BodyError as exc:
        return Status(exc.status, {"detail": exc.detail})
    except ValueError as exc:  # ValidationError is one
        detail = (_validation_detail(exc) if isinstance(exc, ValidationError)
                  else [{"loc": ["body"], "msg": f"body is not valid JSON: {exc}", "type": "json_invalid"}])
        return Status(422, {"detail": detail})
    answers: dict[int, dict] = {}
    valid: list[tuple[int, BatchIn]] = []
    for index, item in enumerate(envelope.batches):
        try:
            valid.append((index, BatchIn.model_validate(item)))
        except ValidationError as exc:
            seq = item.get("seq") if isinstance(item, dict) else None
            answers[index] = {"seq": seq if type(seq) is int else None, "status": "rejected",
                              "detail": _validation_detail(exc, "batches", index)}
    accepted = batches_accept(credential=credential, batches=[batch for _, batch in valid])
    for (index, _), result in zip(valid, accepted, strict=True):
        answers[index] = _interval_answer(result, index)
    return JsonResponse({"results": [answers[i] for i in range(len(envelope.batches))],
                         "config": agent_config(credential.node)})


def _interval_answer(result: IngestResult, index: int) -> dict:
    answer = {"seq": result.seq, "status": result.status}
    if result.status == "conflict":
        answer |= {"detail": result.msg, "last_seq": result.last_seq}
    elif result.status == "rejected":
        answer["detail"] = [{"loc": ["body", "batches", index, *result.loc], "msg": result.msg, "type": "value_error"}]
    return answer


def _rate_limited(node_id: int) -> JsonResponse | None:
    """A 429 when the node has sent more requests this minute than the limit allows (whatever each carries)."""
    window = int(timezone.now().timestamp() // 60)
    count = cache_count(f"ingest-rate:{node_id}:{window}", timeout=120)
    if count <= settings.INGEST_MAX_BATCHES_PER_MINUTE:
        return None
    return JsonResponse(
        {"detail": f"more than {settings.INGEST_MAX_BATCHES_PER_MINUTE} requests a minute; retry later"},
        status=429, headers={"Retry-After": str(60 - int(timezone.now().timestamp()) % 60)},
    )
