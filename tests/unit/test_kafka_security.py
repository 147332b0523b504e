"""The Kafka security settings: checked before anything connects, turned into the same aiokafka
arguments for every client, and the password never shown."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from minichat.client import GatewayClient
from minichat.kafka_security import KafkaSecurity, kafka_client_options, kafka_security
from minichat.settings import Settings

SECRET = "s3cret-Pa55word"


def _sasl(**overrides: object) -> Settings:
    values: dict[str, object] = {
        "kafka_security_protocol": "SASL_PLAINTEXT",
        "kafka_sasl_mechanism": "SCRAM-SHA-512",
        "kafka_sasl_username": "minichat",
        "kafka_sasl_password": SECRET,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def test_plaintext_is_the_default_and_adds_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MINICHAT_KAFKA_BOOTSTRAP_SERVERS", raising=False)  # `make test` sets it
    assert kafka_client_options(Settings()) == {
        "bootstrap_servers": "127.0.0.1:9092",
        "security_protocol": "PLAINTEXT",
    }


def test_sasl_settings_become_aiokafka_arguments_and_the_password_is_never_shown() -> None:
    settings = _sasl()
    options = kafka_client_options(settings)
    assert options["sasl_mechanism"] == "SCRAM-SHA-512" and options["sasl_plain_username"] == "minichat"
    assert options["sasl_plain_password"] == SECRET and "ssl_context" not in options
    assert SECRET not in repr(settings) and SECRET not in str(settings.model_dump())
    assert SECRET not in repr(kafka_security(settings))
    assert SECRET not in repr(kafka_security(settings).faust_credentials())


def test_the_password_file(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text(SECRET + "\n")
    settings = _sasl(kafka_sasl_password=None, kafka_sasl_password_file=secret)
    assert kafka_client_options(settings)["sasl_plain_password"] == SECRET
    with pytest.raises(ValidationError, match="not both"):
        _sasl(kafka_sasl_password_file=secret)
    with pytest.raises(ValidationError, match="no file"):
        _sasl(kafka_sasl_password=None, kafka_sasl_password_file=tmp_path / "missing")


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"kafka_sasl_mechanism": None}, "MINICHAT_KAFKA_SASL_MECHANISM"),
        ({"kafka_sasl_username": None}, "MINICHAT_KAFKA_SASL_USERNAME"),
        ({"kafka_sasl_password": None}, "MINICHAT_KAFKA_SASL_PASSWORD"),
        ({"kafka_security_protocol": "SSL"}, "SASL_*"),
        ({"kafka_ssl_cafile": Path("/nonexistent/ca.pem")}, "MINICHAT_KAFKA_SSL_CAFILE"),
        ({"kafka_security_protocol": "SASL_TLS"}, "kafka_security_protocol"),
    ],
)
def test_an_incomplete_combination_is_refused_without_quoting_the_password(
    overrides: dict[str, object], named: str
) -> None:
    with pytest.raises(ValidationError) as refused:
        _sasl(**overrides)
    assert named in str(refused.value) and SECRET not in str(refused.value)


def test_tls_builds_a_context_from_the_ca_file(tmp_path: Path) -> None:
    ca = Path(__file__).resolve().parents[1] / "missing-on-purpose.pem"
    with pytest.raises(ValueError, match="MINICHAT_KAFKA_SSL_CAFILE"):
        KafkaSecurity(protocol="SSL", ssl_cafile=ca)
    options = KafkaSecurity(protocol="SSL").client_options()  # the system's CAs
    assert options["security_protocol"] == "SSL" and options["ssl_context"].check_hostname


def test_the_gateway_client_takes_the_same_options() -> None:
    with pytest.raises(ValueError, match="MINICHAT_KAFKA_SASL_MECHANISM"):
        GatewayClient("kafka:9092", security_protocol="SASL_SSL", sasl_username="g", sasl_password="p")
    client = GatewayClient(
        "kafka:9092",
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="PLAIN",
        sasl_username="gateway",
        sasl_password=SecretStr(SECRET),
    )
    assert SECRET not in repr(vars(client))


def test_no_option_carries_the_password() -> None:
    """Not even by abbreviation: it is not taken for `--kafka-sasl-password-file`."""
    from minichat import cli

    with pytest.raises(SystemExit):
        cli._parser().parse_args(["worker", "--kafka-sasl-password", SECRET])
