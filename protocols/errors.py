"""The project's one error tree.

Every error the project raises on purpose derives from :class:`HesError`. Adapters translate
foreign exceptions (pymodbus, paho, serial, sqlalchemy) into this tree with ``raise ... from exc``
so that callers never see a library's own exception types::

    HesError
    ├── ConfigError                  a configuration file or option is invalid
    ├── ValidationError              a value object refused its input (OBIS, money, amount, ...)
    ├── DecodeError                  bytes / text that do not parse (frames, payloads, tokens)
    │   └── NeedMoreData             a stream decoder needs more bytes before it can decide
    ├── CommandRefused               a meter refused a command or method; carries a result code
    │   └── TransitionRefused        a disconnect-control trigger not allowed in the mode / state
    ├── StateFileError               a meter's non-volatile state cannot be read or is corrupt
    ├── LinkError                    talking to a meter failed
    │   ├── LinkTimeout              no answer in time
    │   ├── LinkClosed               the connection dropped or could not be opened
    │   ├── LinkCorrupt              an answer came that the transport's library cannot decode
    │   └── DeviceException          the device answered with a protocol exception (e.g. Modbus 02)
    ├── StorageError                 the head-end's database refused or failed an operation
    └── DeliveryError                a notice could not be handed to its channel (SMTP, HTTP)
        └── DeliveryRefused          the channel refused it for good (retrying cannot help)
"""

from __future__ import annotations


class HesError(Exception):
    """Base of every error the project raises on purpose."""


class ConfigError(HesError):
    """A configuration file or option is invalid."""


class ValidationError(HesError, ValueError):
    """A value object refused its input."""


class DecodeError(HesError):
    """Input that does not parse: a frame, a payload, a token, a CSV row."""


class NeedMoreData(DecodeError):
    """A stream decoder cannot decide until more bytes arrive."""


class CommandRefused(HesError):
    """A meter refused a command; ``code`` is the machine-readable reason."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class TransitionRefused(CommandRefused):
    """A disconnect-control trigger that the control mode or the current state does not allow."""


class StateFileError(HesError):
    """A meter's non-volatile state file is unreadable or corrupt."""


class LinkError(HesError):
    """Talking to a meter failed."""


class LinkTimeout(LinkError):
    """The meter did not answer in time."""


class LinkClosed(LinkError):
    """The connection to the meter dropped or could not be opened."""


class LinkCorrupt(LinkError):
    """An answer arrived that the transport's library could not decode (a Modbus frame cut
    short, say): as good as lost, though the request may have been executed."""


class DeviceException(LinkError):
    """The device answered with a protocol-level exception (e.g. a Modbus exception code)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class StorageError(HesError):
    """The head-end's database refused or failed an operation."""


class DeliveryError(HesError):
    """A notice could not be handed to its channel now (the server is down, timed out)."""


class DeliveryRefused(DeliveryError):
    """The channel refused the notice for good (a bad address, a 4xx): do not retry."""
