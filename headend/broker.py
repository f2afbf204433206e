"""A local Mosquitto for the tests, the benches and the demo, and a probe for any broker URL.

:class:`LocalBroker` writes a configuration into a directory of its own (a listener on
127.0.0.1 and a free port, no anonymous access, a password file with PBKDF2-SHA512 hashes in
Mosquitto's ``$7$`` format, an ACL that confines each meter to its own topic tree and lets the
head-end user everywhere, raised queue limits, persistence, and an optional TLS listener with a
CA and server certificate generated here), starts the broker, waits until it accepts
connections, and stops or restarts it on the same port and data directory.

:func:`probe` says whether a broker URL answers an MQTT CONNECT; :func:`choose_broker` applies
the demo's rule: the broker given by URL if it answers, else a local Mosquitto if the binary
exists, else none (the fleet runs on Modbus only).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import getpass
import hashlib
import ipaddress
import logging
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from protocols.errors import ConfigError, HesError
from protocols.mqtt import BrokerSettings, TopicScheme, check_meter_id, meter_password

log = logging.getLogger(__name__)

MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
HEADEND_USER = "hes"
_START_ATTEMPTS = 3


class BrokerError(HesError):
    """A local broker could not be started or stopped."""


def find_mosquitto() -> Path | None:
    """The Mosquitto binary, or None when it is not installed."""
    for candidate in (*MOSQUITTO_PATHS, shutil.which("mosquitto")):
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now (the kernel's choice for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def hash_password(password: str, salt: bytes | None = None, iterations: int = 101) -> str:
    """Mosquitto 2's password-file hash: ``$7$<iterations>$<salt b64>$<PBKDF2-SHA512 b64>``."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


# -- TLS ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def make_tls_files(directory: Path, days: int = 30) -> TlsFiles:
    """A throw-away CA and a server certificate for ``localhost`` / ``127.0.0.1`` signed by it."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "prepaid-hes test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.OID_SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    files.server_key.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    files.server_key.chmod(0o600)
    return files


# -- the broker -----------------------------------------------------------------------------------


def _meter_table(meters: Iterable[str] | Mapping[str, str | None]) -> dict[str, str]:
    if isinstance(meters, Mapping):
        return {check_meter_id(m): meter_password(m, p) for m, p in meters.items()}
    return {check_meter_id(m): meter_password(m) for m in meters}


@dataclass
class LocalBroker:
    """A Mosquitto of our own in ``directory``; use as a context manager or start()/stop().

    ``meters`` are provisioned as users named by their meter id, with the given passwords or,
    for None (or a plain list of ids), the derived default of :func:`protocols.mqtt.meter_password`.
    """

    directory: Path
    meters: Iterable[str] | Mapping[str, str | None] = ()
    topics: TopicScheme = field(default_factory=TopicScheme)
    headend_password: str = field(default_factory=lambda: secrets.token_hex(12))
    tls: bool = False
    persistence: bool = True
    max_queued_messages: int = 1_000_000
    max_inflight_messages: int = 1000
    binary: Path | None = None
    port: int = 0
    tls_port: int = 0
    process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    passwords: dict[str, str] = field(default_factory=dict, init=False, repr=False)
    tls_files: TlsFiles | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        self.passwords = _meter_table(self.meters)
        if HEADEND_USER in self.passwords:
            raise ConfigError(f"{HEADEND_USER!r} is the head-end's user name, not a meter id")
        self.passwords[HEADEND_USER] = self.headend_password

    # -- what clients need ------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def settings(self, username: str = HEADEND_USER, password: str | None = None) -> BrokerSettings:
        """Plain-TCP settings for ``username`` (default: the head-end) with its password."""
        return BrokerSettings(
            self.host, self.port, username, password or self.passwords.get(username)
        )

    def tls_settings(
        self, username: str = HEADEND_USER, password: str | None = None
    ) -> BrokerSettings:
        if self.tls_files is None or not self.tls_port:
            raise ConfigError("this broker has no TLS listener (tls=True)")
        return BrokerSettings(
            self.host,
            self.tls_port,
            username,
            password or self.passwords.get(username),
            tls=True,
            ca_file=str(self.tls_files.ca_cert),
        )

    def meter_settings(self, meter_id: str) -> BrokerSettings:
        return self.settings(meter_id, self.passwords[meter_id])

    @property
    def log_path(self) -> Path:
        return self.directory / "mosquitto.log"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # -- configuration ----------------------------------------------------------------------------

    def _write_config(self) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        data = self.directory / "data"
        data.mkdir(exist_ok=True)
        passwd = self.directory / "passwd"
        passwd.write_text(
            "".join(f"{user}:{hash_password(pw)}\n" for user, pw in self.passwords.items())
        )
        passwd.chmod(0o600)
        acl = self.directory / "acl"
        acl.write_text(
            f"user {HEADEND_USER}\ntopic readwrite #\n\n"
            f"# every other user is a meter: its own tree only\n"
            f"pattern readwrite {self.topics.acl_pattern()}\n"
        )
        acl.chmod(0o600)
        lines = [
            "per_listener_settings false",
            "allow_anonymous false",
            f"password_file {passwd}",
            f"acl_file {acl}",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {data}/",
            "autosave_interval 60",
            f"max_queued_messages {self.max_queued_messages}",
            "max_queued_bytes 0",
            f"max_inflight_messages {self.max_inflight_messages}",
            "set_tcp_nodelay true",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            "connection_messages true",
            f"listener {self.port} {self.host}",
        ]
        if os.geteuid() == 0:
            # as root Mosquitto would switch to the user "mosquitto", who cannot write here
            lines.insert(0, f"user {getpass.getuser()}")
        if self.tls:
            if self.tls_files is None:
                self.tls_files = make_tls_files(self.directory / "tls")
            lines += [
                f"listener {self.tls_port} {self.host}",
                f"cafile {self.tls_files.ca_cert}",
                f"certfile {self.tls_files.server_cert}",
                f"keyfile {self.tls_files.server_key}",
                "tls_version tlsv1.2",
            ]
        conf = self.directory / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    # -- life cycle -------------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        """Start Mosquitto and return once every listener accepts connections.

        Ports not fixed by the caller are chosen free; if another process takes one between the
        choice and the bind, new ports are chosen and the start is tried again.
        """
        if self.running:
            return
        binary = self.binary or find_mosquitto()
        if binary is None:
            raise BrokerError("mosquitto is not installed (apt-get install mosquitto)")
        fixed = bool(self.port)
        for attempt in range(1, _START_ATTEMPTS + 1):
            if not fixed:
                self.port = free_port()
                self.tls_port = free_port() if self.tls else 0
            conf = self._write_config()
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            self.process = subprocess.Popen(
                [str(binary), "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            try:
                self._wait_ready(timeout)
            except BrokerError:
                self._terminate()
                tail = self.log_text()[offset:]
                if not fixed and "in use" in tail and attempt < _START_ATTEMPTS:
                    log.info("broker port taken, trying other ports")
                    continue
                raise
            log.info(
                "mosquitto listening on %s:%d (pid %d)", self.host, self.port, self.process.pid
            )
            return

    def _wait_ready(self, timeout: float) -> None:
        ports = [p for p in (self.port, self.tls_port) if p]
        deadline = time.monotonic() + timeout
        pending = list(ports)
        while pending:
            assert self.process is not None
            if self.process.poll() is not None:
                raise BrokerError(
                    f"mosquitto exited with code {self.process.returncode}: "
                    f"{self.log_text()[-800:].strip()}"
                )
            try:
                with socket.create_connection((self.host, pending[0]), timeout=0.5):
                    pending.pop(0)
                    continue
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise BrokerError(f"mosquitto did not listen on {pending} within {timeout} s")
            time.sleep(0.005)

    def _terminate(self, timeout: float = 10.0) -> int | None:
        process, self.process = self.process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("mosquitto did not stop in %.0f s; killing it", timeout)
                process.kill()
                process.wait()
        return process.returncode

    def stop(self) -> None:
        """Stop the broker gracefully (it saves its persistent sessions and queues)."""
        self._terminate()

    def kill(self) -> None:
        """Stop the broker abruptly (SIGKILL): what it did not save is lost."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        self._terminate()

    def restart(self, timeout: float = 10.0) -> None:
        """Stop and start again on the same ports and data directory."""
        self.stop()
        self.start(timeout)

    def __enter__(self) -> LocalBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# -- probing and choosing a broker ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProbeResult:
    answered: bool  # something spoke MQTT at that address
    accepted: bool  # and it accepted these credentials
    detail: str


_CONNACK_REASONS = {
    0: "accepted",
    1: "unacceptable protocol version",
    2: "client id rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value % 128, value // 128
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _utf8(text: str) -> bytes:
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def _connect_packet(settings: BrokerSettings, client_id: str) -> bytes:
    flags = 0x02  # clean session
    payload = _utf8(client_id)
    if settings.username:
        flags |= 0x80
        payload += _utf8(settings.username)
        if settings.password:
            flags |= 0x40
            payload += _utf8(settings.password)
    body = _utf8("MQTT") + bytes([4, flags]) + (10).to_bytes(2, "big") + payload
    return b"\x10" + _varint(len(body)) + body


def _probe_context(settings: BrokerSettings) -> ssl.SSLContext | None:
    if not settings.tls:
        return None
    context = ssl.create_default_context(cafile=settings.ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


async def probe(settings: BrokerSettings, timeout: float = 2.0) -> ProbeResult:
    """Send an MQTT 3.1.1 CONNECT with ``settings``' credentials and read the CONNACK."""
    client_id = f"hes-probe-{secrets.token_hex(4)}"
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                settings.host,
                settings.port,
                ssl=_probe_context(settings),
                server_hostname=settings.host if settings.tls else None,
            )
            writer.write(_connect_packet(settings, client_id))
            await writer.drain()
            header = await reader.readexactly(4)
            if header[0] != 0x20 or header[1] != 2:
                return ProbeResult(False, False, "not an MQTT broker (no CONNACK)")
            code = header[3]
            if code == 0:
                writer.write(b"\xe0\x00")  # DISCONNECT
                await writer.drain()
            reason = _CONNACK_REASONS.get(code, f"refused with code {code}")
            return ProbeResult(True, code == 0, reason)
    except TimeoutError:
        return ProbeResult(False, False, f"no answer within {timeout} s")
    except (OSError, asyncio.IncompleteReadError, ssl.SSLError) as exc:
        return ProbeResult(False, False, str(exc) or type(exc).__name__)
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()


@dataclass
class BrokerPlan:
    """Which broker the demo uses: ``settings`` (None: no MQTT, Modbus only), the local broker
    started for it (stop it with :meth:`close`), and a sentence saying why."""

    settings: BrokerSettings | None
    local: LocalBroker | None
    note: str

    def close(self) -> None:
        if self.local is not None:
            self.local.stop()


DEFAULT_BROKER_URL = "mqtt://127.0.0.1:1883"
LOCAL = "local"


async def choose_broker(
    url: str | None,
    directory: Path,
    meters: Iterable[str] | Mapping[str, str | None] = (),
    topics: TopicScheme | None = None,
    default_url: str | None = DEFAULT_BROKER_URL,
) -> BrokerPlan:
    """Which broker to use.

    * ``url`` given: that broker; it must answer and accept the credentials, else BrokerError
      (a broker the operator named is never silently replaced).
    * ``url`` is ``"local"``: a local Mosquitto in ``directory`` with ``meters`` provisioned.
    * no ``url``: the broker at ``default_url`` when it answers and accepts both the head-end
      and a meter of the fleet; else a local Mosquitto when the binary exists; else none (the
      fleet runs on Modbus only).
    """
    table = _meter_table(meters)
    if url is not None and url != LOCAL:
        settings = BrokerSettings.parse_url(url)
        result = await probe(settings)
        if not result.accepted:
            raise BrokerError(f"the broker at {settings.url()} did not accept us: {result.detail}")
        return BrokerPlan(settings, None, f"using the broker at {settings.url()}")
    if url == LOCAL:
        reason = "a local broker was asked for"
    else:
        reason = "no broker URL given"
        if default_url is not None:
            settings = BrokerSettings.parse_url(default_url)
            if await _accepts_fleet(settings, table):
                return BrokerPlan(
                    settings, None, f"{reason}: using the broker that answers at {settings.url()}"
                )
            reason += f" and none at {settings.url()} accepts the fleet"
    if find_mosquitto() is None:
        return BrokerPlan(None, None, f"{reason}; mosquitto is not installed: Modbus only")
    local = LocalBroker(directory, table, topics=topics or TopicScheme())
    await asyncio.to_thread(local.start)
    return BrokerPlan(
        local.settings(), local, f"{reason}: started a local mosquitto on port {local.port}"
    )


async def _accepts_fleet(settings: BrokerSettings, meters: Mapping[str, str]) -> bool:
    """The broker accepts us and, when there are meters, the first meter's login too."""
    if not (await probe(settings)).accepted:
        return False
    for meter_id, password in meters.items():
        return (await probe(settings.login(meter_id, password))).accepted
    return True
