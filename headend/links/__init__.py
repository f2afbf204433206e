"""How the head-end talks to meters: one :class:`MeterLink` interface and one confirmed
execution path (:func:`execute_confirmed`), one module per transport, a pool of shared
connections."""

from headend.links.base import MeterLink, RetryPolicy, execute_confirmed, send_command

__all__ = ["MeterLink", "RetryPolicy", "execute_confirmed", "send_command"]
