"""Where an MQTT broker is and how a client logs in to it; meters' derived passwords."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, replace
from urllib.parse import parse_qs, quote, unquote, urlsplit

from protocols.errors import ConfigError
from protocols.meter_id import check_meter_id

# -- broker settings and meter credentials --------------------------------------------------------


def meter_password(meter_id: str, configured: str | None, secret: str | None) -> str:
    """A meter's MQTT password: ``configured`` if set, else derived from the fleet's ``secret``
    and its id (HMAC-SHA256, 32 hex digits) so that the broker configuration can provision it
    too. There is no default secret: without ``configured`` and ``secret`` (None or empty) this
    is a ConfigError, never a password anyone could derive from the meter id alone."""
    meter_id = check_meter_id(meter_id)
    if configured:
        return configured
    if not secret:
        raise ConfigError(
            f"meter {meter_id} has no mqtt_password and there is no password secret to derive "
            "one from ([mqtt] password_secret)"
        )
    digest = hmac.new(secret.encode(), meter_id.encode(), hashlib.sha256)
    return digest.hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """Where a broker is and how to log in: ``mqtt://user:password@host:port`` or
    ``mqtts://host:port?ca=/path/ca.pem`` (TLS, verifying the broker against that CA)."""

    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None
    keepalive: int = 30

    def __post_init__(self) -> None:
        if not self.host:
            raise ConfigError("a broker needs a host")
        if type(self.port) is not int or not 1 <= self.port <= 65535:
            raise ConfigError(f"a broker port is 1..65535, got {self.port!r}")
        if self.ca_file and not self.tls:
            raise ConfigError("a CA file is only used with TLS (mqtts://)")
        if not 5 <= self.keepalive <= 65535:
            raise ConfigError("keepalive is 5..65535 s")

    @classmethod
    def parse_url(cls, url: str) -> BrokerSettings:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ConfigError(f"a broker URL starts with mqtt:// or mqtts://, got {url!r}")
        tls = parts.scheme == "mqtts"
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError as exc:
            raise ConfigError(f"bad port in broker URL {url!r}") from exc
        query = parse_qs(parts.query)
        unknown = sorted(set(query) - {"ca", "keepalive"})
        if unknown:
            raise ConfigError(f"unknown broker URL option(s): {', '.join(unknown)}")
        try:
            keepalive = int(query.get("keepalive", ["30"])[-1])
        except ValueError as exc:
            raise ConfigError(f"keepalive in {url!r} is not a number") from exc
        return cls(
            host=parts.hostname or "",
            port=port,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            tls=tls,
            ca_file=query.get("ca", [None])[-1],
            keepalive=keepalive,
        )

    def url(self, with_password: bool = False) -> str:
        scheme = "mqtts" if self.tls else "mqtt"
        auth = ""
        if self.username:
            auth = quote(self.username, safe="")
            if self.password:
                auth += ":" + (quote(self.password, safe="") if with_password else "***")
            auth += "@"
        query = f"?ca={quote(self.ca_file)}" if self.ca_file else ""
        return f"{scheme}://{auth}{self.host}:{self.port}{query}"

    def login(self, username: str, password: str | None) -> BrokerSettings:
        """The same broker with other credentials (e.g. a meter's)."""
        return replace(self, username=username, password=password)
