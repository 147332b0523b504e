"""How every Kafka client minichat makes authenticates: one object, from the settings or from a
`GatewayClient`'s arguments, turned into aiokafka's keyword arguments and faust's credentials.

The SASL password is held as a `SecretStr` (its repr is masked) and handed to aiokafka only when a
client is built, so no settings dump, log line or failure report carries it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from pydantic import SecretStr

if TYPE_CHECKING:
    from faust.types.auth import CredentialsT

    from minichat.settings import Settings

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
PROTOCOLS: tuple[str, ...] = get_args(SecurityProtocol)
MECHANISMS: tuple[str, ...] = get_args(SaslMechanism)


@dataclass(frozen=True)
class KafkaSecurity:
    """What a client needs to reach a secured cluster. Raises `ValueError` when incomplete."""

    protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = field(default=None, repr=False)
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None

    def __post_init__(self) -> None:
        for problem in security_problems(
            self.protocol,
            self.sasl_mechanism,
            self.sasl_username,
            self.sasl_password is not None,
            (self.ssl_cafile, self.ssl_certfile, self.ssl_keyfile),
        ):
            raise ValueError(problem)

    @property
    def sasl(self) -> bool:
        return self.protocol in ("SASL_PLAINTEXT", "SASL_SSL")

    @property
    def tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    def client_options(self) -> dict[str, Any]:
        """aiokafka's keyword arguments (every client class takes the same ones)."""
        options: dict[str, Any] = {"security_protocol": self.protocol}
        if self.tls:
            options["ssl_context"] = self.ssl_context()
        if self.sasl:
            assert self.sasl_password is not None  # checked in __post_init__
            options["sasl_mechanism"] = self.sasl_mechanism
            options["sasl_plain_username"] = self.sasl_username
            options["sasl_plain_password"] = self.sasl_password.get_secret_value()
        return options

    def ssl_context(self) -> Any:
        """A context that checks the broker's certificate against the CA file (else the system's
        CAs) and its host name, and presents the client certificate when one is set."""
        from aiokafka.helpers import create_ssl_context

        return create_ssl_context(
            cafile=self.ssl_cafile, certfile=self.ssl_certfile, keyfile=self.ssl_keyfile
        )

    def faust_credentials(self) -> CredentialsT | None:
        """The same, for faust's `broker_credentials` (its producer and its own clients)."""
        from faust.auth import SASLCredentials, SSLCredentials

        if self.sasl:
            assert self.sasl_password is not None
            return SASLCredentials(
                username=self.sasl_username,
                password=self.sasl_password.get_secret_value(),
                mechanism=self.sasl_mechanism,
                ssl_context=self.ssl_context() if self.tls else None,
            )
        if self.tls:
            return SSLCredentials(self.ssl_context())
        return None


def security_problems(
    protocol: str,
    mechanism: str | None,
    username: str | None,
    has_password: bool,
    files: tuple[Path | None, ...],
) -> list[str]:
    """What is missing or contradictory, in words naming the settings (empty when usable)."""
    problems = []
    if protocol not in PROTOCOLS:
        problems.append(f"MINICHAT_KAFKA_SECURITY_PROTOCOL must be one of {', '.join(PROTOCOLS)}")
    if mechanism is not None and mechanism not in MECHANISMS:
        problems.append(f"MINICHAT_KAFKA_SASL_MECHANISM must be one of {', '.join(MECHANISMS)}")
    if protocol.startswith("SASL_") and mechanism is None:
        problems.append(f"MINICHAT_KAFKA_SECURITY_PROTOCOL={protocol} needs MINICHAT_KAFKA_SASL_MECHANISM")
    if mechanism is not None and not protocol.startswith("SASL_"):
        problems.append(
            "MINICHAT_KAFKA_SASL_MECHANISM is set: MINICHAT_KAFKA_SECURITY_PROTOCOL must be SASL_*"
        )
    if mechanism is not None and (not username or not has_password):
        problems.append(
            "MINICHAT_KAFKA_SASL_MECHANISM needs MINICHAT_KAFKA_SASL_USERNAME and "
            "MINICHAT_KAFKA_SASL_PASSWORD (or MINICHAT_KAFKA_SASL_PASSWORD_FILE)"
        )
    for name, path in zip(("CAFILE", "CERTFILE", "KEYFILE"), files, strict=True):
        if path is not None and not path.is_file():
            problems.append(f"MINICHAT_KAFKA_SSL_{name}: no file {path}")
    if files[2] is not None and files[1] is None:
        problems.append("MINICHAT_KAFKA_SSL_KEYFILE needs MINICHAT_KAFKA_SSL_CERTFILE")
    if any(path is not None for path in files) and protocol not in ("SSL", "SASL_SSL"):
        problems.append(
            "MINICHAT_KAFKA_SSL_* files are set: MINICHAT_KAFKA_SECURITY_PROTOCOL must be SSL or SASL_SSL"
        )
    return problems


def kafka_security(settings: Settings) -> KafkaSecurity:
    """The settings' security (the password read from its file now, when given by file)."""
    password = settings.kafka_sasl_password
    if password is None and settings.kafka_sasl_password_file is not None:
        password = SecretStr(settings.kafka_sasl_password_file.read_text().rstrip("\r\n"))
    return KafkaSecurity(
        protocol=settings.kafka_security_protocol,
        sasl_mechanism=settings.kafka_sasl_mechanism,
        sasl_username=settings.kafka_sasl_username,
        sasl_password=password,
        ssl_cafile=settings.kafka_ssl_cafile,
        ssl_certfile=settings.kafka_ssl_certfile,
        ssl_keyfile=settings.kafka_ssl_keyfile,
    )


def kafka_client_options(settings: Settings) -> dict[str, Any]:
    """Every aiokafka client minichat builds takes these: the brokers and how to authenticate."""
    return {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        **kafka_security(settings).client_options(),
    }


def gateway_security_arguments(settings: Settings) -> dict[str, Any]:
    """`GatewayClient`'s security arguments from the settings (the simulator and bench use them)."""
    security = kafka_security(settings)
    return {
        "security_protocol": security.protocol,
        "sasl_mechanism": security.sasl_mechanism,
        "sasl_username": security.sasl_username,
        "sasl_password": security.sasl_password,
        "ssl_cafile": security.ssl_cafile,
        "ssl_certfile": security.ssl_certfile,
        "ssl_keyfile": security.ssl_keyfile,
    }
