"""The one configuration object, built once at the entry point and passed down."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from minichat.kafka_security import SaslMechanism, SecurityProtocol, security_problems

PACKAGED_POLICY = Path(__file__).with_name("policy.example.yaml")


class Settings(BaseSettings):
    """docs/contract.md, "Settings" and "Tuning settings" (tuning knobs keep their defaults in production)."""

    # hide_input_in_errors: a refused setting's error never quotes what was given (a password, a URL).
    model_config = SettingsConfigDict(
        env_prefix="MINICHAT_", frozen=True, extra="ignore", hide_input_in_errors=True
    )

    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    # How every Kafka client authenticates (minichat/kafka_security.py). The password comes from
    # the environment or a file only: no command-line option would keep it out of `ps`.
    kafka_security_protocol: SecurityProtocol = "PLAINTEXT"
    kafka_sasl_mechanism: SaslMechanism | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_sasl_password_file: Path | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None
    database_url: str = "postgresql://minichat:minichat@127.0.0.1:5432/minichat"
    # The login that owns the schema: `db migrate`, `db grant-reader`, `db revoke-reader` (and the
    # bench's scratch databases). The worker's own login (`database_url`) owns nothing and cannot
    # create roles (docs/security.md §6); None: the same login does both (a development stack).
    admin_database_url: str | None = None
    topic_prefix: str = "minichat."
    group_id: str = "minichat"
    partitions: int = Field(default=8, ge=1, le=1024)
    # Copies of each partition of the topics `topics create` makes (min.insync.replicas: one
    # less, at least 1); None: min(3, brokers in the cluster).
    replication_factor: int | None = Field(default=None, ge=1, le=16)
    policy_file: Path = PACKAGED_POLICY
    web_port: int = Field(default=6066, ge=0, le=65535)
    web_host: str = "127.0.0.1"
    # The read API's bearer tokens (ids, SHA-256 digests, tenants, expiry), written by
    # `minichat tokens add` and `revoke`. Without it every /v1/ request is refused (401).
    read_tokens_file: Path | None = None

    # Tuning (not in the contract).
    web_enabled: bool = True
    # The web port under abuse: a connection whose request headers are not complete within
    # `web_header_timeout_s` (or that stays idle that long between requests) is closed; beyond
    # `web_max_connections` open ones a new connection is closed at once.
    web_header_timeout_s: float = Field(default=5.0, gt=0, le=300)
    web_max_connections: int = Field(default=256, ge=1, le=10_000)
    # The read API: JSON bytes of one messages page (at least one message), requests in flight
    # (more answer 503), and its own PostgreSQL connections, shared with /metrics' gauges and
    # never the engine's.
    read_page_max_bytes: int = Field(default=4 * 1024 * 1024, ge=64 * 1024)
    read_max_concurrency: int = Field(default=8, ge=1, le=1024)
    read_pool_max: int = Field(default=2, ge=1, le=64)
    # The ordered engine: records per merged batch (one transaction), records buffered per input
    # partition before its fetching pauses, the grace that covers clock skew and replication lag
    # when an empty partition is judged caught up, and output batches whose acknowledgements may be
    # outstanding while the next one applies.
    batch_max: int = Field(default=8000, ge=1, le=20_000)
    lane_buffer_max: int = Field(default=4000, ge=10, le=100_000)
    # Memory bounds in bytes (keys and values), whatever the records' sizes: what waits in the
    # lanes, and what one batch takes. README "Memory" states the worker's bound from these.
    input_buffer_max_bytes: int = Field(default=32 * 1024 * 1024, ge=1024 * 1024)
    batch_max_bytes: int = Field(default=16 * 1024 * 1024, ge=1024 * 1024)
    # A batch of at least `apply_parallel_min` records is applied as up to `apply_parallel` groups
    # that share no chat and no user, each in its own concurrent transaction (the positions are
    # stored once all committed): the worker's Python runs while PostgreSQL works. 1: never.
    apply_parallel: int = Field(default=2, ge=1, le=8)
    apply_parallel_min: int = Field(default=256, ge=2)
    order_grace_ms: int = Field(default=5, ge=0, le=60_000)
    produce_in_flight: int = Field(default=4, ge=1, le=64)
    fetch_max_bytes: int = Field(default=16 * 1024 * 1024, ge=1024 * 1024)
    # How long the broker holds a fetch that finds no records. The engine takes fetched records
    # at once, so every partition is in the fetch in flight and a record appended to any of them
    # ends it: this bounds only what an idle worker spends on empty fetches (and how soon a
    # partition resumed after a pause is fetched again when nothing else arrives).
    fetch_max_wait_ms: int = Field(default=500, ge=1, le=500)
    max_partition_fetch_bytes: int = Field(default=1024 * 1024, ge=64 * 1024)
    # Fault injection for the crash tests: exit (status 86) right after the first batch holding a
    # command committed, before its decisions are sent. Never set in production.
    fault_exit_after_commit: bool = False
    db_pool_min: int = Field(default=2, ge=1)
    db_pool_max: int = Field(default=4, ge=1)
    session_timeout_s: float = Field(default=10.0, gt=0)
    heartbeat_interval_s: float = Field(default=1.0, gt=0)
    log_level: str = "INFO"
    # Leader timers: the outbox relay's period and batch, the watchdog's signals per tick.
    relay_interval_s: float = Field(default=0.2, gt=0, le=60)
    relay_batch_max: int = Field(default=500, ge=1, le=10_000)
    watchdog_batch_max: int = Field(default=500, ge=1, le=10_000)
    # Dependency faults. A batch, relay run or watchdog sweep that fails on a transient error is
    # retried with exponential backoff (capped at `retry_max_backoff_s`); after `retry_give_up_s`
    # of failing the worker exits with status 70. Kafka is also probed for metadata every
    # `broker_check_interval_s` (no batch arrives while it is away); after `broker_give_up_s` of
    # failed probes the worker exits with status 70 too.
    retry_give_up_s: float = Field(default=120.0, gt=0)
    retry_max_backoff_s: float = Field(default=5.0, gt=0, le=60)
    broker_give_up_s: float = Field(default=120.0, gt=0)
    broker_check_interval_s: float = Field(default=2.0, gt=0, le=60)

    @field_validator("database_url", "admin_database_url")
    @classmethod
    def _is_a_postgresql_url(cls, value: str | None) -> str | None:
        # Refused here, as a setting (exit 2), not later as a failed connection. The message never
        # quotes the value: it may hold a password.
        if value is not None and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("not a PostgreSQL URL: it must start with postgresql://")
        return value

    @field_validator("kafka_bootstrap_servers")
    @classmethod
    def _is_a_broker_list(cls, value: str) -> str:
        hosts = [h.strip() for h in value.split(",")]
        ports = [h.rpartition(":")[2] for h in hosts if ":" in h and not h.endswith("]")]
        if not all(hosts) or not all(p.isdigit() for p in ports):
            raise ValueError("not a broker list: host:port[,host:port...]")
        return value

    @model_validator(mode="after")
    def _kafka_security_is_usable(self) -> Settings:
        if self.kafka_sasl_password is not None and self.kafka_sasl_password_file is not None:
            raise ValueError(
                "set MINICHAT_KAFKA_SASL_PASSWORD or MINICHAT_KAFKA_SASL_PASSWORD_FILE, not both"
            )
        if self.kafka_sasl_password_file is not None and not self.kafka_sasl_password_file.is_file():
            raise ValueError(f"MINICHAT_KAFKA_SASL_PASSWORD_FILE: no file {self.kafka_sasl_password_file}")
        has_password = self.kafka_sasl_password is not None or self.kafka_sasl_password_file is not None
        files = (self.kafka_ssl_cafile, self.kafka_ssl_certfile, self.kafka_ssl_keyfile)
        problems = security_problems(
            self.kafka_security_protocol,
            self.kafka_sasl_mechanism,
            self.kafka_sasl_username,
            has_password,
            files,
        )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def admin_url(self) -> str:
        """The login of the schema's owner: `admin_database_url`, else `database_url`."""
        return self.admin_database_url or self.database_url

    @property
    def kafka_broker_url(self) -> str:
        """faust wants `kafka://host:port;kafka://host:port`."""
        hosts = [h.strip() for h in self.kafka_bootstrap_servers.split(",") if h.strip()]
        return ";".join(f"kafka://{h}" for h in hosts)
