"""The payment API's request and answer bodies (pydantic models: validation and the OpenAPI
document's schemas, defined once). Money is integer minor units of the account's currency,
energy integer Wh; times are ISO 8601 with a time zone."""

from __future__ import annotations

from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictInt

from headend.domain.registry import ID_PATTERN

MAX_AMOUNT = 10**15  # minor units: far above any vend, far below 64-bit overflow
#: a channel's reference: printable, and no "/" (it is a path segment of the API)
REFERENCE_PATTERN = r"^[^/\x00-\x1f\x7f]+$"
ID = f"^{ID_PATTERN}$"

Reference = Field(
    min_length=1,
    max_length=128,
    pattern=REFERENCE_PATTERN,
    description="The channel's own reference: unique per channel, reused for every retry; "
    "printable, without '/'.",
)
MeterId = Field(default=None, pattern=ID, description="The meter paid for.")
AccountId = Field(
    default=None,
    pattern=ID,
    description="The account paid for, instead of meter_id: its one active meter is credited "
    "(an account with several meters is refused: name the meter).",
)
Amount = Field(gt=0, le=MAX_AMOUNT, description="Integer minor units, e.g. 10000 for 100.00 KES.")
Currency = Field(
    default=None,
    pattern="^[A-Z]{3}$",
    description="ISO 4217 code; refused (currency_mismatch) if not the account's.",
)


class Problem(BaseModel):
    """Every refusal: a machine-readable code and a human detail."""

    code: str = Field(description="e.g. unknown_account, reference_conflict, unauthorized.")
    detail: str


class PaymentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reference: str = Reference
    meter_id: str | None = MeterId
    account_id: str | None = AccountId
    amount: StrictInt = Amount
    currency: str | None = Currency
    paid_at: AwareDatetime = Field(
        description="When the channel took the money (at most 7 days ago, 5 minutes ahead)."
    )
    payer: str | None = Field(
        default=None, min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$"
    )
    channel: str | None = Field(
        default=None,
        max_length=64,
        description="Optional: if given, the calling channel's own name (a channel acts only "
        "as itself; another name is refused with forbidden).",
    )


class QuoteIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    meter_id: str | None = MeterId
    account_id: str | None = AccountId
    amount: StrictInt = Amount


class ReversalIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=500, description="Why (kept on the ledger).")


class SplitOut(BaseModel):
    """Where the money goes: amount = debt_recovered + fee + service_charge + energy_gross."""

    amount: int
    debt_recovered: int
    fee: int
    service_charge: int
    tax: int = Field(description="VAT included in the fee, the service charge and the energy.")
    energy_gross: int
    energy_net: int
    change_in: int
    change_out: int
    credit_unit: Literal["money", "energy"]
    credit_value: int = Field(description="Minor units.")
    credit_amount: int = Field(description="In the credit unit: minor units, or Wh.")
    wh: int = Field(description="Energy bought, Wh.")


class DeliveryOut(BaseModel):
    kind: Literal["transfer", "token"]
    number: int = Field(description="The meter's transfer number, or the token's TID.")
    state: str = Field(description="pending_delivery, delivered, cancelled; issued, accepted.")


class PaymentOut(BaseModel):
    """The answer to a payment: given again, unchanged, to every repeat of the same request."""

    payment_id: int
    receipt: int = Field(description="The receipt number (gapless).")
    channel: str
    reference: str
    account: str
    meter: str
    tariff: str
    currency: str
    currency_scale: int = Field(description="Minor units per major unit as a power of ten: -2.")
    payer: str | None
    paid_at: str
    split: SplitOut
    delivery: DeliveryOut | None
    token: str | None = Field(description="A keypad meter's 20-digit STS token.")


class PaymentStateOut(PaymentOut):
    """A payment as it stands now: its first answer and where it went since."""

    state: Literal["accepted", "reversed"]
    delivery_state: str | None
    reversal_reason: str | None


class ReceiptOut(PaymentStateOut):
    text: str = Field(description="The receipt as printed.")
    reprint: bool = Field(description="A reprint: the same token as first issued.")


class QuoteOut(BaseModel):
    meter: str
    account: str
    tariff: str
    tariff_kind: str
    currency: str
    currency_scale: int
    delivery: Literal["transfer", "token"]
    split: SplitOut


class LastReadingOut(BaseModel):
    at: str = Field(description="The meter's clock at the reading.")
    credit: int = Field(description="The meter's credit: minor units, or Wh.")
    relay: str


class MeterOut(BaseModel):
    meter_id: str
    credit_unit: str
    keypad: bool
    last_reading: LastReadingOut | None
    days_left: int | None = Field(
        description="Whole days the credit lasts at the account's own pace of the last 14 "
        "days (the balance monitor's forecast); null until there is such a pace."
    )


class PaymentLine(BaseModel):
    reference: str
    receipt: int
    paid_at: str
    amount: int
    state: str
    delivery_state: str | None


class AccountOut(BaseModel):
    account_id: str
    status: str
    currency: str | None
    currency_scale: int | None
    prepaid: int = Field(description="Paid for, not yet delivered to the meter, and change.")
    debt: int
    meters: list[MeterOut]
    recent_payments: list[PaymentLine] = Field(description="This channel's latest, newest first.")
