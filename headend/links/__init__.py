"""How the head-end talks to meters: one :class:`MeterLink` interface, one module per transport."""

from headend.links.base import MeterLink, send_command

__all__ = ["MeterLink", "send_command"]
