"""A COSEM-like object model: the interface classes a prepaid meter exposes (IEC 62056-6-2).

Each object has a logical name (attribute 1), numbered attributes and numbered methods, as in
DLMS. The objects hold state and the rules that belong to one object (the disconnect-control
state machine, emergency credit invocation); the meter firmware in ``meter_sim`` composes them and
carries the rules that span objects. A refused method raises a typed error, never does nothing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar

from protocols.disconnect import ControlState, Trigger, find_transition, output_state
from protocols.errors import CommandRefused, ValidationError
from protocols.obis import Obis
from protocols.units import ScalerUnit, Unit

# -- well-known logical names ---------------------------------------------------------------------

OBIS_SERIAL = Obis(0, 0, 96, 1, 0)
OBIS_CLOCK = Obis(0, 0, 1, 0, 0)
OBIS_ENERGY_IMPORT = Obis(1, 0, 1, 8, 0)
OBIS_ENERGY_RATES = tuple(Obis(1, 0, 1, 8, rate) for rate in (1, 2, 3, 4))
OBIS_POWER = Obis(1, 0, 1, 7, 0)
OBIS_VOLTAGE = Obis(1, 0, 32, 7, 0)
OBIS_CURRENT = Obis(1, 0, 31, 7, 0)
OBIS_POWER_FACTOR = Obis(1, 0, 13, 7, 0)
OBIS_FREQUENCY = Obis(1, 0, 14, 7, 0)
OBIS_DISCONNECT = Obis(0, 0, 96, 3, 10)
OBIS_LIMITER = Obis(0, 0, 17, 0, 0)
OBIS_LOAD_PROFILE = Obis(1, 0, 99, 1, 0)
OBIS_EVENT_LOG = Obis(0, 0, 99, 98, 0)
OBIS_ACCOUNT = Obis(0, 0, 19, 0, 0)
OBIS_TOKEN_CREDIT = Obis(0, 0, 19, 10, 0)
OBIS_EMERGENCY_CREDIT = Obis(0, 0, 19, 10, 1)
OBIS_CHARGE = Obis(0, 0, 19, 20, 0)
OBIS_TOKEN_GATEWAY = Obis(0, 0, 19, 40, 0)


class CosemObject:
    """Base of the interface classes: attribute ``n`` is ``ATTRIBUTES[n - 1]``."""

    CLASS_ID: ClassVar[int]
    ATTRIBUTES: ClassVar[tuple[str, ...]]
    METHODS: ClassVar[tuple[str, ...]] = ()

    logical_name: Obis

    def get(self, index: int) -> Any:
        """Attribute ``index`` (1-based, attribute 1 is the logical name)."""
        if not 1 <= index <= len(self.ATTRIBUTES):
            raise ValidationError(
                f"class {self.CLASS_ID} has attributes 1..{len(self.ATTRIBUTES)}, not {index}"
            )
        return getattr(self, self.ATTRIBUTES[index - 1])

    def attributes(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.ATTRIBUTES}


@dataclass(slots=True)
class Data(CosemObject):
    """Class 1: a value without a unit (serial number, firmware version)."""

    CLASS_ID: ClassVar[int] = 1
    ATTRIBUTES: ClassVar[tuple[str, ...]] = ("logical_name", "value")
    logical_name: Obis
    value: Any


@dataclass(slots=True)
class Register(CosemObject):
    """Class 3: an integer value with a scaler and unit."""

    CLASS_ID: ClassVar[int] = 3
    ATTRIBUTES: ClassVar[tuple[str, ...]] = ("logical_name", "value", "scaler_unit")
    METHODS: ClassVar[tuple[str, ...]] = ("reset",)
    logical_name: Obis
    value: int
    scaler_unit: ScalerUnit

    def reset(self) -> None:
        self.value = 0


@dataclass(slots=True)
class Clock(CosemObject):
    """Class 8: the meter's clock. ``time`` is seconds since the Unix epoch (UTC)."""

    CLASS_ID: ClassVar[int] = 8
    ATTRIBUTES: ClassVar[tuple[str, ...]] = ("logical_name", "time", "time_zone", "status")
    logical_name: Obis
    time: int = 0
    time_zone: int = 0  # minutes east of UTC
    status: int = 0  # bit 0 invalid value, bit 2 different clock base, bit 7 daylight saving


class SortMethod(IntEnum):
    FIFO = 1


@dataclass(slots=True)
class ProfileGeneric(CosemObject):
    """Class 7: a bounded buffer of captured rows; column 0 of every row is its capture time.

    ``select_range`` is the selective access by range [from, to] on the capture time.
    """

    CLASS_ID: ClassVar[int] = 7
    ATTRIBUTES: ClassVar[tuple[str, ...]] = (
        "logical_name",
        "buffer",
        "capture_objects",
        "capture_period",
        "sort_method",
        "sort_object",
        "entries_in_use",
        "profile_entries",
    )
    METHODS: ClassVar[tuple[str, ...]] = ("reset", "capture")
    logical_name: Obis
    capture_objects: tuple[str, ...]
    capture_period: int
    profile_entries: int
    buffer: deque[tuple[int, ...]] = field(default_factory=deque)
    sort_method: SortMethod = SortMethod.FIFO
    sort_object: str = "time"

    def __post_init__(self) -> None:
        if self.profile_entries < 1:
            raise ValidationError("a profile keeps at least one entry")
        self.buffer = deque(self.buffer, maxlen=self.profile_entries)

    @property
    def entries_in_use(self) -> int:
        return len(self.buffer)

    def reset(self) -> None:
        self.buffer.clear()

    def capture(self, row: tuple[int, ...]) -> None:
        if len(row) != len(self.capture_objects):
            raise ValidationError(
                f"a row of {self.logical_name} has {len(self.capture_objects)} columns"
            )
        self.buffer.append(row)

    def select_range(self, start: int, end: int) -> list[tuple[int, ...]]:
        """Rows with ``start <= time <= end``, oldest first."""
        return [row for row in self.buffer if start <= row[0] <= end]

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        return iter(self.buffer)


@dataclass(slots=True)
class DisconnectControl(CosemObject):
    """Class 70: the supply relay. See :mod:`protocols.disconnect` for the state machine."""

    CLASS_ID: ClassVar[int] = 70
    ATTRIBUTES: ClassVar[tuple[str, ...]] = (
        "logical_name",
        "output_state",
        "control_state",
        "control_mode",
    )
    METHODS: ClassVar[tuple[str, ...]] = ("remote_disconnect", "remote_reconnect")
    logical_name: Obis
    control_mode: int = 4
    control_state: ControlState = ControlState.CONNECTED

    def __post_init__(self) -> None:
        if self.control_mode not in range(7):
            raise ValidationError(f"control mode is 0..6, got {self.control_mode!r}")
        if self.control_mode == 0:
            self.control_state = ControlState.CONNECTED

    @property
    def output_state(self) -> bool:
        return output_state(self.control_state)

    def fire(self, trigger: Trigger) -> str:
        """Apply ``trigger``; returns the transition letter or raises TransitionRefused."""
        letter, target = find_transition(self.control_mode, self.control_state, trigger)
        self.control_state = target
        return letter

    def remote_disconnect(self) -> str:
        return self.fire(Trigger.REMOTE_DISCONNECT)

    def remote_reconnect(self) -> str:
        return self.fire(Trigger.REMOTE_RECONNECT)

    def set_mode(self, mode: int) -> None:
        if mode not in range(7):
            raise ValidationError(f"control mode is 0..6, got {mode!r}")
        self.control_mode = mode
        if mode == 0:
            self.control_state = ControlState.CONNECTED


@dataclass(slots=True)
class Limiter(CosemObject):
    """Class 71: trips the relay when the monitored power stays above the threshold too long."""

    CLASS_ID: ClassVar[int] = 71
    ATTRIBUTES: ClassVar[tuple[str, ...]] = (
        "logical_name",
        "monitored_value",
        "threshold_active",
        "threshold_normal",
        "min_over_threshold_duration",
        "min_under_threshold_duration",
    )
    logical_name: Obis
    monitored_value: Obis = OBIS_POWER
    threshold_active: int = 0  # W; 0 disables the limiter
    threshold_normal: int = 0
    min_over_threshold_duration: int = 60  # s
    min_under_threshold_duration: int = 300  # s


class PaymentMode(IntEnum):
    CREDIT = 1
    PREPAYMENT = 2


class AccountStatus(IntEnum):
    NEW = 1
    ACTIVE = 2
    CLOSED = 3


class CreditUnit(IntEnum):
    """The unit an account holds its credit in (the DLMS currency unit): energy or money."""

    CONSUMPTION = 1
    MONETARY = 2


class CreditStatusBit(IntEnum):
    """Bits of the account's current_credit_status (class 111 attribute 5)."""

    IN_CREDIT = 0
    LOW_CREDIT = 1
    NEXT_CREDIT_ENABLED = 2
    NEXT_CREDIT_SELECTABLE = 3
    CREDIT_REFERENCE_LIST = 4
    SELECTABLE_CREDIT_IN_USE = 5
    OUT_OF_CREDIT = 6
    RESERVED = 7


@dataclass(slots=True)
class Account(CosemObject):
    """Class 111: the prepaid account. Amounts are integers in the account's currency unit
    (minor currency units for a monetary account, Wh for a consumption account)."""

    CLASS_ID: ClassVar[int] = 111
    ATTRIBUTES: ClassVar[tuple[str, ...]] = (
        "logical_name",
        "account_mode_and_status",
        "current_credit_in_use",
        "current_credit_status",
        "available_credit",
        "amount_to_clear",
        "clearance_threshold",
        "aggregated_debt",
        "low_credit_threshold",
        "max_provision",
        "currency",
    )
    METHODS: ClassVar[tuple[str, ...]] = ("activate_account", "close_account", "reset_account")
    logical_name: Obis
    payment_mode: PaymentMode = PaymentMode.PREPAYMENT
    status: AccountStatus = AccountStatus.ACTIVE
    current_credit_in_use: Obis = OBIS_TOKEN_CREDIT
    current_credit_status: int = 0
    available_credit: int = 0
    amount_to_clear: int = 0
    clearance_threshold: int = 0
    aggregated_debt: int = 0
    low_credit_threshold: int = 0
    max_provision: int = 0  # most credit one transfer may add; 0 = no limit
    currency_name: str = "XXX"
    currency_scale: int = -2
    credit_unit: CreditUnit = CreditUnit.MONETARY

    @property
    def account_mode_and_status(self) -> tuple[int, int]:
        return (int(self.payment_mode), int(self.status))

    @property
    def currency(self) -> tuple[str, int, int]:
        return (self.currency_name, self.currency_scale, int(self.credit_unit))

    def has_status(self, bit: CreditStatusBit) -> bool:
        return bool(self.current_credit_status >> bit & 1)

    def activate_account(self) -> None:
        if self.status is AccountStatus.CLOSED:
            raise CommandRefused("a closed account cannot be activated")
        self.status = AccountStatus.ACTIVE

    def close_account(self) -> None:
        self.status = AccountStatus.CLOSED

    def reset_account(self) -> None:
        """Back to a new account: status new, nothing available, nothing owed."""
        self.status = AccountStatus.NEW
        self.available_credit = 0
        self.amount_to_clear = 0
        self.aggregated_debt = 0
        self.current_credit_status = 0


class CreditType(IntEnum):
    TOKEN = 0
    RESERVED = 1
    EMERGENCY = 2
    TIME_BASED = 3
    CONSUMPTION_BASED = 4


class CreditStatus(IntEnum):
    ENABLED = 0
    SELECTABLE = 1
    INVOKED = 2
    IN_USE = 3
    CONSUMED = 4


@dataclass(slots=True)
class Credit(CosemObject):
    """Class 112: one credit (token credit or emergency credit)."""

    CLASS_ID: ClassVar[int] = 112
    ATTRIBUTES: ClassVar[tuple[str, ...]] = (
        "logical_name",
        "current_credit_amount",
        "credit_type",
        "priority",
        "warning_threshold",
        "limit",
        "credit_status",
        "preset_credit_amount",
    )
    METHODS: ClassVar[tuple[str, ...]] = ("update_amount", "set_amount_to_value", "invoke_credit")
    logical_name: Obis
    credit_type: CreditType
    current_credit_amount: int = 0
    priority: int = 1
    warning_threshold: int = 0
    limit: int = 0
    credit_status: CreditStatus = CreditStatus.ENABLED
    preset_credit_amount: int = 0

    def update_amount(self, delta: int) -> None:
        """Method 1: add ``delta`` (negative to take away) to the current amount.

        An object-level primitive: the meter firmware keeps its ledger through its own top-up
        and charge rules, which call neither this nor set_amount_to_value.
        """
        if type(delta) is not int:
            raise ValidationError(f"a credit amount is an integer, got {delta!r}")
        self.current_credit_amount += delta

    def set_amount_to_value(self, value: int) -> None:
        """Method 2: set the current amount."""
        if type(value) is not int:
            raise ValidationError(f"a credit amount is an integer, got {value!r}")
        self.current_credit_amount = value

    def invoke_credit(self) -> None:
        """Emergency credit: a selectable credit becomes in use with its preset amount."""
        if self.credit_type is not CreditType.EMERGENCY:
            raise CommandRefused("only an emergency credit can be invoked")
        if self.credit_status is not CreditStatus.SELECTABLE:
            raise CommandRefused(
                f"emergency credit is {self.credit_status.name.lower()}, not selectable"
            )
        self.current_credit_amount = self.preset_credit_amount
        self.credit_status = CreditStatus.IN_USE


@dataclass(slots=True)
class Charge(CosemObject):
    """Class 113: the unit charge per tariff rate (minor currency units per kWh)."""

    CLASS_ID: ClassVar[int] = 113
    ATTRIBUTES: ClassVar[tuple[str, ...]] = (
        "logical_name",
        "total_amount_paid",
        "charge_type",
        "priority",
        "unit_charge_active",
        "last_collection_amount",
    )
    logical_name: Obis
    unit_charge_active: tuple[int, ...] = ()
    total_amount_paid: int = 0
    charge_type: int = 1  # 1 consumption-based collection
    priority: int = 1
    last_collection_amount: int = 0


class TokenStatus(IntEnum):
    """Class 115 token_status codes."""

    FORMAT_OK = 0
    AUTHENTICATION_OK = 1
    VALIDATION_OK = 2
    EXECUTION_OK = 3
    FORMAT_FAILURE = 4
    AUTHENTICATION_FAILED = 5
    VALIDATION_FAILED = 6
    EXECUTION_FAILED = 7
    RECEIVED = 8


@dataclass(slots=True)
class TokenGateway(CosemObject):
    """Class 115: the last token entered, when, and what became of it."""

    CLASS_ID: ClassVar[int] = 115
    ATTRIBUTES: ClassVar[tuple[str, ...]] = (
        "logical_name",
        "token",
        "token_time",
        "token_description",
        "token_delivery_method",
        "token_status",
    )
    METHODS: ClassVar[tuple[str, ...]] = ("enter",)
    logical_name: Obis
    token: str = ""
    token_time: int = 0
    token_description: tuple[str, ...] = ()
    token_delivery_method: int = 0  # 0 remote, 1 local (keypad), 2 manual
    token_status: TokenStatus = TokenStatus.RECEIVED

    def enter(self, token: str, time: int, method: int = 1) -> None:
        """Method 1: a token arrives (0 remote, 1 keypad, 2 manual); the meter decides what
        becomes of it and sets ``token_status``."""
        if method not in (0, 1, 2):
            raise ValidationError(f"a token delivery method is 0, 1 or 2, got {method!r}")
        self.token = token.strip()[:40]
        self.token_time = time
        self.token_delivery_method = method
        self.token_status = TokenStatus.RECEIVED


def energy_register(obis: Obis, value: int = 0) -> Register:
    return Register(obis, value, ScalerUnit(0, Unit.WATT_HOUR))


def index_objects(objects: Iterable[CosemObject]) -> dict[Obis, CosemObject]:
    """Objects by logical name; a duplicate name is a programming error."""
    table: dict[Obis, CosemObject] = {}
    for obj in objects:
        if obj.logical_name in table:
            raise ValidationError(f"two objects named {obj.logical_name}")
        table[obj.logical_name] = obj
    return table
