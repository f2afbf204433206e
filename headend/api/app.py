"""The payment channels' HTTP API (FastAPI) over the storage's payment functions.

Every request names its channel with ``Authorization: Bearer <API key>``; a channel acts only
as itself (it sees and reverses its own payments and receipts). A channel registered with
``--require-signature`` also signs each request (headend/domain/signature.py); a signature
outside the window, or seen before by any worker, is refused.

A worker keeps each channel it has authenticated for :data:`CHANNEL_TTL` seconds, so a
request costs no lookup of its key; a payment is checked against the stored channel (still
active, still this key) in its own transaction, so a channel suspended or given a new key
pays nothing more at once, and is unknown to the other endpoints within that time.

Every refusal is JSON ``{"code", "detail"}`` with a 4xx status (a database that cannot be
reached: 503 ``unavailable``), and is logged. A refused payment changes no balance; the
attempt is kept for the operator (``hes payments attempts``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from headend.api.pdf import receipt_pdf
from headend.api.schemas import (
    ID,
    REFERENCE_PATTERN,
    AccountOut,
    PaymentIn,
    PaymentOut,
    PaymentStateOut,
    Problem,
    QuoteIn,
    QuoteOut,
    ReceiptOut,
    ReversalIn,
)
from headend.domain.pricing import Code, PaymentRefused, receipt_text
from headend.domain.signature import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WINDOW,
    SignatureCode,
    SignatureRefused,
    verify,
)
from headend.storage import Database
from headend.storage.ledger import (
    ChannelView,
    PaymentIntake,
    PaymentRequest,
    PaymentView,
    channel_for_key,
    list_payments,
    payment_by_receipt,
    payment_by_reference,
    quote,
    record_attempt,
    remember_signature,
    reprint,
    reverse_payment,
)
from headend.storage.views import account_overview
from protocols.clock import Clock, SystemClock
from protocols.errors import StorageError

log = logging.getLogger(__name__)

TITLE = "prepaid-hes payment API"
VERSION = "1"
PAYMENTS_PATH = "/v1/payments"

UNAUTHORIZED = "unauthorized"
FORBIDDEN = "forbidden"
NO_SUCH_KEY = "no active channel has this API key"

#: seconds a worker trusts a channel it has authenticated without reading it again
CHANNEL_TTL = 5.0

#: the HTTP status of each refusal code
STATUS: dict[str, int] = {
    UNAUTHORIZED: 401,
    **{str(code): 401 for code in SignatureCode},
    FORBIDDEN: 403,
    Code.UNKNOWN_ACCOUNT: 404,
    Code.UNKNOWN_PAYMENT: 404,
    Code.UNKNOWN_RECEIPT: 404,
    Code.UNKNOWN_CHANNEL: 404,
    Code.REFERENCE_CONFLICT: 409,
    Code.ALREADY_REVERSED: 409,
    Code.IN_DELIVERY: 409,
    Code.ACCOUNT_CLOSED: 422,
    Code.AMOUNT_OUT_OF_BOUNDS: 422,
    Code.CURRENCY_MISMATCH: 422,
    Code.MALFORMED_FIELD: 422,
    Code.NOT_VENDABLE: 422,
}


class Refusal(Exception):
    """A request refused with ``code`` (its status from :data:`STATUS`)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


class Channels:
    """The channels this worker has authenticated, by (the SHA-256 of) their API keys, each
    trusted for ``ttl`` seconds (at most ``most`` kept; an unknown key is never kept)."""

    def __init__(self, db: Database, ttl: float = CHANNEL_TTL, most: int = 4096) -> None:
        self.db = db
        self.ttl = ttl
        self.most = most
        self._known: dict[bytes, tuple[ChannelView, float]] = {}

    async def get(self, key: str) -> ChannelView | None:
        digest = hashlib.sha256(key.encode()).digest()
        now = time.monotonic()
        known = self._known.get(digest)
        if known is not None and now - known[1] < self.ttl:
            return known[0]
        channel = await channel_for_key(self.db, key)
        if channel is None:
            self._known.pop(digest, None)
            return None
        if len(self._known) >= self.most:
            self._known.clear()
        self._known[digest] = (channel, now)
        return channel

    def forget(self, key: str) -> None:
        """Read the channel of ``key`` again at its next request."""
        self._known.pop(hashlib.sha256(key.encode()).digest(), None)


@dataclass(frozen=True, slots=True)
class ApiState:
    db: Database
    clock: Clock
    #: concurrent payments written together (group commit), each answered as pay() would
    intake: PaymentIntake
    channels: Channels
    #: called once a new payment is committed (the credit deliverer of this process wakes)
    taken: Callable[[], None] | None = None

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.now(), UTC)


def _problems(*statuses: int, ok: dict[str, Any] | None = None) -> dict[int | str, dict[str, Any]]:
    descriptions = {
        401: "No or an unknown API key; a missing, wrong, stale or replayed signature.",
        403: "Another channel's receipt, or a body naming another channel.",
        404: "No such account, payment or receipt (of this channel).",
        409: "The reference was used for a different payment; a reversal in delivery.",
        422: "A malformed field (named), or a payment the account's tariff refuses.",
        503: "The database cannot be reached: retry with the same reference.",
    }
    out: dict[int | str, dict[str, Any]] = {} if ok is None else {200: ok}
    for status in (401, *statuses, 503):
        out[status] = {"model": Problem, "description": descriptions[status]}
    return out


bearer = HTTPBearer(auto_error=False, description="The channel's API key (hes channels add).")


async def authenticate(
    request: Request, credentials: HTTPAuthorizationCredentials | None
) -> ChannelView:
    """The calling channel, its signature checked and remembered if it signs."""
    known = getattr(request.state, "channel", None)
    if isinstance(known, ChannelView):
        return known
    state: ApiState = request.app.state.hes
    if credentials is None:
        raise Refusal(UNAUTHORIZED, "send Authorization: Bearer <the channel's API key>")
    channel = await state.channels.get(credentials.credentials)
    if channel is None:
        raise Refusal(UNAUTHORIZED, NO_SUCH_KEY)
    if channel.require_signature:
        assert channel.signing_secret is not None
        now = state.now()
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        try:
            digest = verify(
                channel.signing_secret.encode(),
                request.headers.get(TIMESTAMP_HEADER),
                request.headers.get(SIGNATURE_HEADER),
                method=request.method,
                path=path,
                body=await request.body(),
                now=now,
            )
        except SignatureRefused as refused:
            raise Refusal(refused.code, refused.detail) from refused
        if not await remember_signature(state.db, channel.name, digest, now, 2 * WINDOW):
            raise Refusal(
                SignatureCode.REPLAYED_SIGNATURE,
                "this signature was seen before: sign each request (a retry too) anew",
            )
    request.state.channel = channel
    request.state.key = credentials.credentials
    return channel


async def caller(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    timestamp: Annotated[
        str | None,
        Header(
            alias=TIMESTAMP_HEADER,
            description="Signing channels: Unix time in seconds.",
            max_length=20,
        ),
    ] = None,
    signature: Annotated[
        str | None,
        Header(
            alias=SIGNATURE_HEADER,
            description="Signing channels: sha256=HMAC-SHA256 of the timestamp, method, path "
            "and body (see docs/payments.md).",
            max_length=80,
        ),
    ] = None,
) -> ChannelView:
    return await authenticate(request, credentials)


Caller = Annotated[ChannelView, Depends(caller)]
ReferencePath = Annotated[str, Path(min_length=1, max_length=128, pattern=REFERENCE_PATTERN)]


async def _state(request: Request) -> ApiState:
    # async, though it never waits: FastAPI runs a plain function dependency in a thread
    state: ApiState = request.app.state.hes
    return state


State = Annotated[ApiState, Depends(_state)]

router = APIRouter(prefix="/v1")


async def _refused_attempt(
    state: ApiState, channel: str, *, reference: str | None, code: str, detail: str, body: Any
) -> None:
    try:
        document = body if isinstance(body, str) else json.dumps(body, default=str)
        await record_attempt(
            state.db,
            channel,
            reference=reference,
            code=code,
            detail=detail,
            request=document,
            now=state.now(),
            source="api",
        )
    except StorageError as exc:  # the refusal stands; only its record is lost
        log.error("keeping the refused attempt of %s failed: %s", channel, exc)


@router.post(
    "/payments",
    status_code=201,
    response_model=PaymentOut,
    responses=_problems(
        403, 404, 409, 422, ok={"model": PaymentOut, "description": "The same request again."}
    ),
    summary="Take a payment",
)
async def post_payment(body: PaymentIn, channel: Caller, state: State, http: Request) -> Response:
    """Take a payment for a meter (or an account's one meter): split it, post it to the
    ledger, number its receipt and owe the meter its credit (a transfer, or an STS token in
    the answer). The same body again under a used reference gets the first answer (200);
    a different one is refused with reference_conflict."""
    if body.channel is not None and body.channel != channel.name:
        detail = f"channel {channel.name} cannot pay as {body.channel}"
        await _refused_attempt(
            state,
            channel.name,
            reference=body.reference,
            code=FORBIDDEN,
            detail=detail,
            body=body.model_dump(mode="json"),
        )
        raise Refusal(FORBIDDEN, detail)
    try:
        request = PaymentRequest(
            channel.name,
            body.reference,
            body.meter_id,
            body.amount,
            body.currency,
            body.payer,
            account_id=body.account_id,
            paid_at=body.paid_at,
        )
    except PaymentRefused as refused:
        await _refused_attempt(
            state,
            channel.name,
            reference=body.reference,
            code=str(refused.code),
            detail=refused.detail,
            body=body.model_dump(mode="json"),
        )
        raise
    key: str = http.state.key
    try:
        answer = await state.intake.pay(
            request, state.now(), actor=f"channel:{channel.name}", source="api", key=key
        )
    except PaymentRefused as refused:
        if refused.code != Code.UNKNOWN_CHANNEL:
            raise
        state.channels.forget(key)  # suspended, or given another key, since it was kept
        raise Refusal(UNAUTHORIZED, NO_SUCH_KEY) from refused
    if answer.replayed:
        return JSONResponse(answer.answer, status_code=200)
    if state.taken is not None:
        state.taken()
    # the answer as stored (a PaymentOut's fields, made by the storage), not validated again
    return JSONResponse(answer.answer, status_code=201)


@router.get(
    "/payments/{reference}",
    response_model=PaymentStateOut,
    responses=_problems(404, 422),
    summary="A payment of this channel",
)
async def get_payment(reference: ReferencePath, channel: Caller, state: State) -> dict[str, Any]:
    """The payment this channel posted under ``reference``: its first answer, its state
    (accepted, reversed) and where its credit is."""
    view = await payment_by_reference(state.db, channel.name, reference)
    return view.document()


@router.post(
    "/payments/{reference}/reversal",
    response_model=PaymentStateOut,
    responses=_problems(404, 409, 422),
    summary="Reverse a payment",
)
async def post_reversal(
    reference: ReferencePath, body: ReversalIn, channel: Caller, state: State
) -> dict[str, Any]:
    """Give the channel its money back. Credit not yet delivered is cancelled; credit the
    meter has, or a token, becomes the account's debt. A reversal of a reversed payment
    answers the same (an advice may be sent again)."""
    if not body.reason.strip():
        raise Refusal(Code.MALFORMED_FIELD, "reason: a reversal says why")
    view = await payment_by_reference(state.db, channel.name, reference)
    if view.state != "reversed":
        try:
            view = await reverse_payment(
                state.db, view.payment_id, body.reason, state.now(), actor=f"channel:{channel.name}"
            )
        except PaymentRefused as refused:
            if refused.code != Code.ALREADY_REVERSED:
                raise
            view = await payment_by_reference(state.db, channel.name, reference)
    return view.document()


def _receipt(view: PaymentView, *, reprinted: bool) -> dict[str, Any]:
    return view.document() | {
        "text": receipt_text(view.answer, view.state, reprint=reprinted),
        "reprint": reprinted,
    }


@router.post(
    "/payments/{reference}/reprint",
    response_model=ReceiptOut,
    responses=_problems(404, 422),
    summary="Reprint a payment's receipt and token",
)
async def post_reprint(reference: ReferencePath, channel: Caller, state: State) -> dict[str, Any]:
    """The receipt and the token as first issued, never a new token (the reprint is on the
    audit trail)."""
    view = await payment_by_reference(state.db, channel.name, reference)
    view = await reprint(state.db, view.payment_id, state.now(), actor=f"channel:{channel.name}")
    return _receipt(view, reprinted=True)


def _wants_pdf(accept: str) -> bool:
    for item in accept.split(","):
        kind = item.split(";")[0].strip().lower()
        if kind == "application/pdf":
            return True
        if kind in ("application/json", "application/*", "*/*"):
            return False
    return False


@router.get(
    "/receipts/{number}",
    response_model=ReceiptOut,
    responses=_problems(
        403, 404, 422, ok={"content": {"application/pdf": {}}, "description": "JSON or PDF."}
    ),
    summary="A receipt, as JSON or PDF",
)
async def get_receipt(
    number: Annotated[
        str,
        Path(
            pattern=r"^[0-9]{1,18}(\.pdf)?$",
            description="The receipt number; with .pdf (or Accept: application/pdf) a PDF.",
        ),
    ],
    channel: Caller,
    state: State,
    accept: Annotated[str, Header()] = "application/json",
) -> Any:
    """One of this channel's receipts as JSON, or as PDF with ``Accept: application/pdf`` or
    the ``.pdf`` suffix."""
    pdf = number.endswith(".pdf") or _wants_pdf(accept)
    view = await payment_by_receipt(state.db, int(number.removesuffix(".pdf")))
    if view.channel != channel.name:
        raise Refusal(FORBIDDEN, f"receipt {view.receipt} is another channel's")
    if pdf:
        return Response(
            receipt_pdf(view.answer, view.state),
            media_type="application/pdf",
            headers={"Content-Disposition": f'inline; filename="receipt-{view.receipt}.pdf"'},
        )
    return _receipt(view, reprinted=False)


@router.get(
    "/accounts/{account_id}",
    response_model=AccountOut,
    responses=_problems(404, 422),
    summary="An account's balance, meters and this channel's recent payments",
)
async def get_account(
    account_id: Annotated[str, Path(pattern=ID)], channel: Caller, state: State
) -> dict[str, Any]:
    """The account's balances in the ledger (money paid and not yet delivered, debt); per
    meter its last reading and the days its credit lasts at its own pace; this channel's
    latest payments to it."""
    overview = await account_overview(state.db, account_id)
    if overview is None:
        raise Refusal(Code.UNKNOWN_ACCOUNT, f"no account {account_id!r}")
    payments = await list_payments(state.db, channel=channel.name, account=account_id, limit=10)
    return {
        "account_id": overview.account_id,
        "status": overview.status,
        "currency": overview.currency,
        "currency_scale": overview.currency_scale,
        "prepaid": overview.prepaid,
        "debt": overview.debt,
        "meters": [
            {
                "meter_id": m.meter_id,
                "credit_unit": m.credit_unit,
                "keypad": m.keypad,
                "last_reading": None
                if m.last_reading_at is None
                else {"at": m.last_reading_at.isoformat(), "credit": m.credit, "relay": m.relay},
                "days_left": m.days_left,
            }
            for m in overview.meters
        ],
        "recent_payments": [
            {
                "reference": p.reference,
                "receipt": p.receipt,
                "paid_at": p.paid_at.isoformat(),
                "amount": p.amount,
                "state": p.state,
                "delivery_state": p.delivery_state,
            }
            for p in payments
        ],
    }


@router.post(
    "/quotes",
    response_model=QuoteOut,
    responses=_problems(404, 422),
    summary="What an amount buys now",
)
async def post_quote(body: QuoteIn, channel: Caller, state: State) -> dict[str, Any]:
    """The split of an amount for a meter now, after debt, fee, service charge and VAT:
    what a payment would give. Stores nothing."""
    if (body.meter_id is None) == (body.account_id is None):
        raise Refusal(Code.MALFORMED_FIELD, "meter_id or account_id: a quote names one of the two")
    result = await quote(
        state.db, body.meter_id, body.amount, state.now(), account_id=body.account_id
    )
    return result.document()


# -- refusals -------------------------------------------------------------------------------------


def _problem(code: str, detail: str, status: int | None = None) -> JSONResponse:
    status = status or STATUS.get(code, 422)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"code": code, "detail": detail}, status_code=status, headers=headers)


def _logged(request: Request, code: str, detail: str) -> None:
    log.info("refused %s %s: %s: %s", request.method, request.url.path, code, detail)


async def _on_refusal(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Refusal | PaymentRefused)
    code, detail = str(exc.code), exc.detail
    _logged(request, code, detail)
    return _problem(code, detail)


def _field(loc: Any) -> str:
    parts = [str(part) for part in loc]
    if parts and parts[0] in ("body", "path", "query", "header"):
        parts = parts[1:] or parts
    return ".".join(parts) or "body"


async def _on_invalid(request: Request, exc: Exception) -> Response:
    """FastAPI's validation errors as malformed_field, naming the field; a payment's attempt
    is kept once the caller is known (an unknown caller is refused as unauthorized)."""
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid"}
    field = _field(first.get("loc", ("body",)))
    detail = f"{field}: {first.get('msg', 'invalid')}"
    if len(errors) > 1:
        detail += f" (and {len(errors) - 1} more)"
    try:
        credentials = await bearer(request)
        channel = await authenticate(request, credentials)
    except Refusal as refused:
        _logged(request, refused.code, refused.detail)
        return _problem(refused.code, refused.detail)
    except StorageError as exc_:
        return await _on_storage(request, exc_)
    _logged(request, Code.MALFORMED_FIELD, detail)
    if request.method == "POST" and request.url.path == PAYMENTS_PATH:
        body = (await request.body()).decode(errors="replace")
        reference = None
        try:
            parsed = json.loads(body)
            if isinstance(parsed, dict) and isinstance(parsed.get("reference"), str):
                reference = parsed["reference"]
        except ValueError:
            pass
        await _refused_attempt(
            request.app.state.hes,
            channel.name,
            reference=reference,
            code=Code.MALFORMED_FIELD,
            detail=detail,
            body=body,
        )
    return _problem(Code.MALFORMED_FIELD, detail)


async def _on_storage(request: Request, exc: Exception) -> Response:
    log.error("%s %s: the database failed: %s", request.method, request.url.path, exc)
    return _problem(
        "unavailable", "the database cannot be reached: retry with the same reference", 503
    )


async def _on_http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    codes = {404: "not_found", 405: "method_not_allowed"}
    code = codes.get(exc.status_code, "http_error")
    _logged(request, code, str(exc.detail))
    return _problem(code, str(exc.detail), exc.status_code)


Handler = Callable[[Request, Exception], Awaitable[Response]]


def _app() -> FastAPI:
    app = FastAPI(
        title=TITLE,
        version=VERSION,
        description="Payment channels post payments, look them up, reverse and reprint them, "
        "read receipts (JSON or PDF), accounts and quotes. Money is integer minor units. "
        "Every refusal is {code, detail}; see docs/payments.md.",
    )
    app.include_router(router)
    handlers: dict[type[Exception], Handler] = {
        Refusal: _on_refusal,
        PaymentRefused: _on_refusal,
        RequestValidationError: _on_invalid,
        StorageError: _on_storage,
        StarletteHTTPException: _on_http,
    }
    for kind, handler in handlers.items():
        app.add_exception_handler(kind, handler)
    return app


def create_app(
    db: Database, clock: Clock | None = None, *, taken: Callable[[], None] | None = None
) -> FastAPI:
    """The API over ``db`` (which the caller opens and closes), on ``clock`` (default: the
    system's); ``taken`` is called after each new payment is committed."""
    app = _app()
    app.state.hes = ApiState(db, clock or SystemClock(), PaymentIntake(db), Channels(db), taken)
    return app


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document of the API (what ``/openapi.json`` serves)."""
    document: dict[str, Any] = _app().openapi()
    return document
