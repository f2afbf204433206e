"""A Mosquitto of the project's own (tests, benches, the demo, operators), and a broker probe.

:class:`LocalBroker` writes a configuration into a directory of its own (listeners on 127.0.0.1,
no anonymous access, raised queue limits, persistence, an optional TLS listener with a CA and
server certificate generated here) with Mosquitto's dynamic-security plugin holding the users,
their PBKDF2-SHA512 password hashes and the ACL (:func:`security_document`: each meter confined
to its own topic tree *and* to its own client id, the head-end user everywhere), starts the
broker, waits until it accepts connections, and stops or restarts it on the same ports and data
directory. :meth:`LocalBroker.write` only writes the configuration, for ``hes broker config``;
:func:`run_configured` runs such a directory in the foreground (``hes broker run``).

:func:`probe` logs in with paho and says whether a broker answered and accepted the credentials;
:func:`choose_broker` applies the demo's rule: the broker given by URL if it answers, else a
local Mosquitto if the binary exists, else none (the fleet runs on Modbus only).
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import getpass
import hashlib
import ipaddress
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt import client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from protocols.errors import ConfigError, HesError
from protocols.mqtt import (
    BrokerSettings,
    TopicScheme,
    check_meter_id,
    meter_password,
)

log = logging.getLogger(__name__)

MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
HEADEND_USER = "hes"
DYNSEC_PLUGIN = "mosquitto_dynamic_security.so"
METER_SESSION_EXPIRY = 7 * 86400  # what a probe leaves a meter's session with (the agent's)
HEADEND_FILE = "headend.url"  # the head-end's broker URL with its password
SECURITY_FILE = "dynamic-security.json"  # users, password hashes and ACL
_START_ATTEMPTS = 3
_RUNNING = " running\n"  # Mosquitto's log line once every listener is open


class BrokerError(HesError):
    """A local broker could not be started or stopped."""


def find_mosquitto() -> Path | None:
    """The Mosquitto binary, or None when it is not installed."""
    for candidate in (*MOSQUITTO_PATHS, shutil.which("mosquitto")):
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def find_dynsec_plugin(binary: Path | None = None) -> Path | None:
    """Mosquitto's dynamic-security plugin (shipped with Mosquitto 2), or None."""
    prefixes = [Path("/usr"), Path("/usr/local"), Path("/opt/homebrew")]
    if binary is not None:
        prefixes.insert(0, binary.resolve().parent.parent)
    for prefix in prefixes:
        for lib in ("lib", "lib64"):
            for candidate in (prefix / lib).glob(f"**/{DYNSEC_PLUGIN}"):
                if candidate.is_file():
                    return candidate
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now (the kernel's choice for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


_HASH_ITERATIONS = 101  # Mosquitto's own default for PBKDF2-SHA512


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


def meter_passwords(
    meters: Iterable[str] | Mapping[str, str | None], secret: str | None
) -> dict[str, str]:
    """Each meter's MQTT password: its explicit ``mqtt_password`` (the mapping's value) when
    set, else the one derived from the fleet's ``secret`` and its id
    (:func:`protocols.mqtt.meter_password`); a plain iterable of ids derives them all. A meter
    that needs a derived password while ``secret`` is None is a ConfigError."""
    if isinstance(meters, Mapping):
        return {check_meter_id(m): meter_password(m, p, secret) for m, p in meters.items()}
    return {check_meter_id(m): meter_password(m, None, secret) for m in meters}


_ACL_TYPES = ("publishClientSend", "publishClientReceive", "subscribePattern", "unsubscribePattern")


def _role(name: str, topic: str) -> dict[str, Any]:
    acls = [{"acltype": kind, "topic": topic, "priority": 0, "allow": True} for kind in _ACL_TYPES]
    return {"rolename": name, "acls": acls}


def password_fields(
    password: str, salt: bytes | None = None, iterations: int = _HASH_ITERATIONS
) -> dict[str, Any]:
    """A client's password as the dynamic-security plugin stores it (what ``mosquitto_ctrl
    dynsec`` writes): base64 PBKDF2-SHA512 digest, base64 salt, iteration count."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return {
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": iterations,
    }


def security_document(passwords: Mapping[str, str], topics: TopicScheme) -> dict[str, Any]:
    """The dynamic-security plugin's configuration: users, password hashes and ACL.

    Every meter is a client whose user name *and client id* are its meter id, so the broker
    refuses a login that presents one meter's credentials with another meter's client id (that
    would otherwise take over the other meter's session and its queued commands). A meter's role
    lets it publish, receive and subscribe under its own ``<prefix>/v1/meters/<id>/#`` only. The
    head-end user is bound to no client id (its links and ingest workers each have their own)
    and may use every topic except the ``$``-topics (the plugin's control API among them).
    Anything not granted is denied.
    """
    clients: list[dict[str, Any]] = []
    roles: list[dict[str, Any]] = [_role(HEADEND_USER, "#")]
    for user, password in passwords.items():
        client: dict[str, Any] = {"username": user, **password_fields(password)}
        if user == HEADEND_USER:
            client["roles"] = [{"rolename": HEADEND_USER}]
        else:
            role = f"meter:{user}"
            client["clientid"] = user
            client["roles"] = [{"rolename": role}]
            roles.append(_role(role, topics.meter_root(user) + "/#"))
        clients.append(client)
    return {
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": False,
            "subscribe": False,
            "unsubscribe": True,
        },
        "clients": clients,
        "groups": [],
        "roles": roles,
    }


@dataclass
class LocalBroker:
    """A Mosquitto of our own in ``directory``; use as a context manager or start()/stop().

    ``meters`` are provisioned as users named by their meter id, with the given passwords or,
    for None (or a plain list of ids), the password derived from ``meter_secret``, the fleet's
    password secret (:func:`meter_passwords`); it has no default, and None (every meter has a
    password of its own) makes a meter without one a ConfigError. ``tls`` adds a TLS listener
    with a CA and server certificate generated in ``directory/tls``; ``plain=False`` then closes
    the plain listener.
    """

    directory: Path
    meters: Iterable[str] | Mapping[str, str | None] = ()
    topics: TopicScheme = field(default_factory=TopicScheme)
    headend_password: str = field(default_factory=lambda: secrets.token_hex(12))
    tls: bool = False
    plain: bool = True  # the plain-TCP listener (False: TLS only)
    meter_secret: str | None = field(kw_only=True)
    tls_days: int = 30  # validity of the generated certificates
    persistence: bool = True
    max_queued_messages: int = 1_000_000
    max_inflight_messages: int = 1000
    binary: Path | None = None
    plugin: Path | None = None  # the dynamic-security plugin; found next to Mosquitto if None
    port: int = 0
    tls_port: int = 0
    process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    passwords: dict[str, str] = field(default_factory=dict, init=False, repr=False)
    tls_files: TlsFiles | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory).resolve()  # the config names absolute paths
        if not (self.plain or self.tls):
            raise ConfigError("a broker needs a listener: plain, TLS or both")
        self.passwords = meter_passwords(self.meters, self.meter_secret)
        if HEADEND_USER in self.passwords:
            raise ConfigError(f"{HEADEND_USER!r} is the head-end's user name, not a meter id")
        self.passwords[HEADEND_USER] = self.headend_password

    # -- what clients need ------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def settings(self, username: str = HEADEND_USER, password: str | None = None) -> BrokerSettings:
        """Plain-TCP settings for ``username`` (default: the head-end) with its password."""
        if not self.plain:
            raise ConfigError("this broker has no plain listener (TLS only)")
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

    def headend_settings(self) -> BrokerSettings:
        """The head-end's login on the broker's preferred listener: TLS when there is one."""
        return self.tls_settings() if self.tls else self.settings()

    @property
    def headend_file(self) -> Path:
        """Where :meth:`write` puts the head-end's broker URL, password included (mode 0600)."""
        return self.directory / HEADEND_FILE

    @property
    def config_path(self) -> Path:
        return self.directory / "mosquitto.conf"

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

    def write(self) -> Path:
        """Write the whole configuration into ``directory`` for the ports set (the config file,
        the users, password hashes and ACL, the TLS files, the head-end's URL in
        :attr:`headend_file`) and return the config file's path."""
        if (self.plain and not self.port) or (self.tls and not self.tls_port):
            raise ConfigError("choose the listeners' ports before writing the configuration")
        self.directory.mkdir(parents=True, exist_ok=True)
        data = self.directory / "data"
        data.mkdir(exist_ok=True)
        plugin = self.plugin or find_dynsec_plugin(self.binary or find_mosquitto())
        if plugin is None:
            raise BrokerError(
                f"mosquitto's dynamic-security plugin ({DYNSEC_PLUGIN}) is not installed; "
                "it binds each meter's client id to its user name"
            )
        security = self.directory / SECURITY_FILE
        security.write_text(json.dumps(security_document(self.passwords, self.topics), indent=1))
        security.chmod(0o600)
        lines = [
            "per_listener_settings false",
            "allow_anonymous false",
            f"plugin {plugin}",
            f"plugin_opt_config_file {security}",
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
        ]
        if self.plain:
            lines.append(f"listener {self.port} {self.host}")
        if os.geteuid() == 0:
            # as root Mosquitto would switch to the user "mosquitto", who cannot write here
            lines.insert(0, f"user {getpass.getuser()}")
        if self.tls:
            if self.tls_files is None:
                self.tls_files = make_tls_files(self.directory / "tls", self.tls_days)
            lines += [
                f"listener {self.tls_port} {self.host}",
                f"cafile {self.tls_files.ca_cert}",
                f"certfile {self.tls_files.server_cert}",
                f"keyfile {self.tls_files.server_key}",
                "tls_version tlsv1.2",
            ]
        conf = self.config_path
        conf.write_text("\n".join(lines) + "\n")
        self.headend_file.write_text(self.headend_settings().url(with_password=True) + "\n")
        self.headend_file.chmod(0o600)
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
        fixed = bool(self.port or self.tls_port)
        for attempt in range(1, _START_ATTEMPTS + 1):
            if not fixed:
                self.port = free_port() if self.plain else 0
                self.tls_port = free_port() if self.tls else 0
            conf = self.write()
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            self.process = subprocess.Popen(
                [str(binary), "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            try:
                self._wait_ready(timeout, offset)
            except BrokerError:
                self._terminate()
                tail = self.log_text()[offset:]
                if not fixed and "in use" in tail and attempt < _START_ATTEMPTS:
                    log.info("broker port taken, trying other ports")
                    continue
                raise
            log.info(
                "mosquitto listening on %s port %s (pid %d)",
                self.host,
                " and ".join(str(p) for p in (self.port, self.tls_port) if p),
                self.process.pid,
            )
            return

    def _wait_ready(self, timeout: float, offset: int) -> None:
        assert self.process is not None
        ports = [p for p in (self.port, self.tls_port) if p]
        _wait_listening(
            self.process,
            [(self.host, p) for p in ports],
            timeout,
            lambda: self.log_text()[offset:],
        )

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


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "nothing in its log"


def _wait_listening(
    process: subprocess.Popen[bytes],
    listeners: Iterable[tuple[str, int]],
    timeout: float,
    log_text: Callable[[], str],
) -> None:
    """Return once the broker has logged that it runs (it opens every listener first: a port
    that another process holds makes it exit instead) and every listener accepts a TCP
    connection; BrokerError if it exits first or ``timeout`` passes. ``log_text`` gives this
    run's log."""
    deadline = time.monotonic() + timeout
    pending = list(listeners)
    running = False
    while pending:
        if process.poll() is not None:
            reason = _last_line(log_text())
            raise BrokerError(f"mosquitto exited with code {process.returncode}: {reason}")
        running = running or _RUNNING in log_text()
        if running:
            try:
                with socket.create_connection(pending[0], timeout=0.5):
                    pending.pop(0)
                    continue
            except OSError:
                pass
        if time.monotonic() > deadline:
            ports = [port for _, port in pending]
            raise BrokerError(f"mosquitto did not listen on {ports} within {timeout} s")
        time.sleep(0.005)


# -- running a written configuration in the foreground --------------------------------------------


def configured_listeners(directory: Path) -> list[tuple[str, int]]:
    """The (host, port) of each listener in ``directory``'s mosquitto.conf."""
    conf = directory / "mosquitto.conf"
    try:
        text = conf.read_text()
    except OSError as exc:
        raise ConfigError(f"{conf}: {exc.strerror} (write it with `hes broker config`)") from exc
    listeners = []
    for line in text.splitlines():
        words = line.split()
        if len(words) == 3 and words[0] == "listener" and words[1].isdigit():
            listeners.append((words[2], int(words[1])))
    if not listeners:
        raise ConfigError(f"{conf} configures no listener")
    return listeners


def run_configured(
    directory: Path,
    on_ready: Callable[[list[tuple[str, int]]], None],
    binary: Path | None = None,
    timeout: float = 10.0,
) -> int:
    """Run Mosquitto in the foreground with ``directory``'s configuration until it exits or
    this process gets SIGINT (Ctrl-C) or SIGTERM, which stop it cleanly (it saves its
    sessions and queues). ``on_ready`` is called once every listener accepts connections.
    Returns 0 after a clean stop; BrokerError, with the last line of its log, when Mosquitto
    fails to start or exits with an error."""
    directory = Path(directory)
    listeners = configured_listeners(directory)
    binary = binary or find_mosquitto()
    if binary is None:
        raise BrokerError("mosquitto is not installed (apt-get install mosquitto)")
    log_path = directory / "mosquitto.log"
    offset = log_path.stat().st_size if log_path.exists() else 0

    def log_text() -> str:
        try:
            with log_path.open("rb") as handle:
                handle.seek(offset)
                return handle.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    process = subprocess.Popen(
        [str(binary), "-c", str(directory / "mosquitto.conf")], stdin=subprocess.DEVNULL
    )

    def stop(signum: int, _frame: object) -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        try:
            _wait_listening(process, listeners, timeout, log_text)
            on_ready(listeners)
            code = process.wait()
        except KeyboardInterrupt:
            stop(signal.SIGINT, None)
            code = process.wait()
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if code != 0:
        raise BrokerError(f"mosquitto exited with code {code}: {_last_line(log_text())}")
    return code


# -- probing and choosing a broker ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProbeResult:
    answered: bool  # something spoke MQTT at that address
    accepted: bool  # and it accepted these credentials
    detail: str


class _ProbeTls(ssl.SSLContext):
    """A client context that keeps the sockets it wrapped: paho leaves a socket open when the
    TLS handshake fails, so the probe closes them itself."""

    wrapped: list[ssl.SSLSocket]

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        sock = super().wrap_socket(*args, **kwargs)
        self.wrapped.append(sock)
        return sock


def _probe_context(settings: BrokerSettings) -> _ProbeTls:
    context = _ProbeTls(ssl.PROTOCOL_TLS_CLIENT)
    context.wrapped = []
    if settings.ca_file:
        context.load_verify_locations(settings.ca_file)
    else:
        context.load_default_certs()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _probe_blocking(
    settings: BrokerSettings, timeout: float, client_id: str | None, keep_session: int | None
) -> ProbeResult:
    """Connect with paho (MQTT 5) and wait for the CONNACK; runs in a worker thread."""
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id or f"hes-probe-{secrets.token_hex(4)}",
        protocol=paho.MQTTv5,
    )
    connect = None
    if keep_session is not None:
        connect = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        connect.SessionExpiryInterval = keep_session
    client.manual_ack_set(True)  # a message of a resumed session stays queued for its owner
    if settings.username:
        client.username_pw_set(settings.username, settings.password)
    tls = _probe_context(settings) if settings.tls else None
    if tls is not None:
        client.tls_set_context(tls)
    client.connect_timeout = timeout
    answers: list[ReasonCode] = []

    def on_connect(
        _client: paho.Client,
        _userdata: Any,
        _flags: paho.ConnectFlags,
        reason: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        answers.append(reason)

    client.on_connect = on_connect
    deadline = time.monotonic() + timeout
    try:
        client.connect(
            settings.host,
            settings.port,
            keepalive=settings.keepalive,
            clean_start=keep_session is None,
            properties=connect,
        )
        while not answers:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return ProbeResult(False, False, f"no answer within {timeout} s")
            if client.loop(min(remaining, 0.1)) != paho.MQTT_ERR_SUCCESS and not answers:
                return ProbeResult(False, False, "not an MQTT broker (no CONNACK)")
        reason = answers[0]
        if reason.is_failure:
            return ProbeResult(True, False, str(reason).lower())
        client.disconnect()
        return ProbeResult(True, True, "accepted")
    except (OSError, ValueError) as exc:  # ssl.SSLError and socket.timeout are OSErrors
        return ProbeResult(False, False, str(exc) or type(exc).__name__)
    finally:
        sock = client.socket()
        if sock is not None:
            sock.close()
        for wrapped in tls.wrapped if tls is not None else ():
            wrapped.close()


async def probe(
    settings: BrokerSettings,
    timeout: float = 2.0,
    *,
    client_id: str | None = None,
    keep_session: int | None = None,
) -> ProbeResult:
    """Log in with ``settings``' credentials (paho, MQTT 5) and report the broker's CONNACK.

    The probe's client id is its own (``hes-probe-…``) unless ``client_id`` is given: a broker
    that binds client ids to user names (the project's) accepts a meter's login only with the
    meter's id. ``keep_session`` (seconds) then resumes that client's session instead of
    starting clean, reads nothing beyond the CONNACK and leaves the session with that expiry,
    so its subscriptions and queued messages stay for the meter.
    """
    return await asyncio.to_thread(_probe_blocking, settings, timeout, client_id, keep_session)


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
    *,
    secret: str | None,
) -> BrokerPlan:
    """Which broker to use.

    * ``url`` given: that broker; it must answer and accept the credentials, else BrokerError
      (a broker the operator named is never silently replaced).
    * ``url`` is ``"local"``: a local Mosquitto in ``directory`` with ``meters`` provisioned.
    * no ``url``: the broker at ``default_url`` when it answers and accepts both the head-end
      and a meter of the fleet; else a local Mosquitto when the binary exists; else none (the
      fleet runs on Modbus only).

    ``secret`` is the fleet's password secret, from which meters without a password of their
    own derive theirs (required; None when every meter has its own).
    """
    table = meter_passwords(meters, secret)
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
    local = LocalBroker(directory, table, topics=topics or TopicScheme(), meter_secret=None)
    await asyncio.to_thread(local.start)
    return BrokerPlan(
        local.settings(), local, f"{reason}: started a local mosquitto on port {local.port}"
    )


async def _accepts_fleet(settings: BrokerSettings, meters: Mapping[str, str]) -> bool:
    """The broker accepts us and, when there are meters, the first meter's login too (as that
    meter, keeping its session: a live meter of that id is briefly disconnected)."""
    if not (await probe(settings)).accepted:
        return False
    for meter_id, password in meters.items():
        meter = settings.login(meter_id, password)
        return (await probe(meter, client_id=meter_id, keep_session=METER_SESSION_EXPIRY)).accepted
    return True
