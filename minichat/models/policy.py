"""The quota policy file (docs/contract.md, "Policy file"): its pydantic model, loading, and
canonical snapshot."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Hashable
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal
from uuid import UUID

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from minichat.models.bounds import MAX_MULTIPLIER, MAX_TOKENS

Tier = Literal["standard", "premium"]

MAX_CREDITS = 2**63 - 1
"""Limits are stored in BIGINT columns."""

Multiplier = Annotated[int, Field(strict=True, gt=0, le=MAX_MULTIPLIER)]
TokenLimit = Annotated[int, Field(strict=True, ge=1, le=MAX_TOKENS)]
"""A positive token count (also `bytes_per_token`, a divisor)."""
Count = Annotated[int, Field(strict=True, ge=0, le=MAX_TOKENS)]
"""A token budget or a call/image count."""
CreditLimit = Annotated[int, Field(strict=True, ge=0, le=MAX_CREDITS)]
Seconds = Annotated[int, Field(strict=True, gt=0)]
ModelId = Annotated[str, Field(strict=True, min_length=1, max_length=1024)]


class PolicyError(Exception):
    """The policy file is missing, unreadable or invalid. The message names the file and field(s)."""

    def __init__(self, path: Path, problems: list[tuple[str, str]]) -> None:
        self.path = path
        self.problems = problems
        lines = [f"{field}: {msg}" if field else msg for field, msg in problems]
        super().__init__(f"invalid policy file {path}: " + "; ".join(lines))


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CatalogModel(_Frozen):
    id: ModelId
    tier: Tier
    enabled: StrictBool = True
    default: StrictBool = False
    input_tokens_credit_multiplier_micro: Multiplier
    output_tokens_credit_multiplier_micro: Multiplier
    max_output_tokens: TokenLimit
    max_input_tokens: TokenLimit
    web_search: StrictBool = False
    code_interpreter: StrictBool = False


class PeriodLimits(_Frozen):
    """Micro-credits per user and period."""

    daily: CreditLimit
    monthly: CreditLimit


class TierLimits(_Frozen):
    """`standard` limits bucket `total`; `premium` limits bucket `tier:premium`."""

    standard: PeriodLimits
    premium: PeriodLimits


class PeriodLimitsOverride(_Frozen):
    daily: CreditLimit | None = None
    monthly: CreditLimit | None = None


class LimitsOverride(_Frozen):
    standard: PeriodLimitsOverride = PeriodLimitsOverride()
    premium: PeriodLimitsOverride = PeriodLimitsOverride()


ThresholdPercent = Annotated[int, Field(strict=True, ge=1, le=100)]
MAX_THRESHOLDS = 5


class Alerts(_Frozen):
    """Budget alerts (`quota.threshold_crossed`): the percentages of a limit at which settled spend
    raises one event per window. Strictly increasing (a list written out of order or with a repeat
    is refused, not silently sorted: the file says what fires); empty turns alerts off."""

    thresholds_percent: Annotated[tuple[ThresholdPercent, ...], Field(max_length=MAX_THRESHOLDS)] = (
        50,
        80,
        100,
    )

    @model_validator(mode="after")
    def _increasing(self) -> Alerts:
        values = self.thresholds_percent
        for i in range(1, len(values)):
            if values[i] <= values[i - 1]:
                raise _rule_error(f"alerts.thresholds_percent.{i}", "thresholds must be strictly increasing")
        return self


DEFAULT_ALERTS = Alerts()


class TenantOverride(_Frozen):
    limits: LimitsOverride = LimitsOverride()
    alerts: Alerts | None = None
    """Replaces the policy's `alerts` for this tenant."""


class KillSwitches(_Frozen):
    disable_premium_tier: StrictBool = False
    force_standard_tier: StrictBool = False
    disable_web_search: StrictBool = False
    disable_code_interpreter: StrictBool = False
    disable_images: StrictBool = False


class Estimation(_Frozen):
    bytes_per_token: TokenLimit
    fixed_overhead_tokens: Count
    safety_margin_pct: Annotated[int, Field(strict=True, ge=0, le=1000)]
    image_token_budget: Count
    web_search_surcharge_tokens: Count
    code_interpreter_surcharge_tokens: Count
    minimal_generation_floor: Count


class Tools(_Frozen):
    web_search_daily_quota: Count
    code_interpreter_daily_quota: Count


class Policy(_Frozen):
    """One version of the policy file. Immutable; settlement uses the snapshot it was admitted under."""

    version: Annotated[int, Field(strict=True, ge=1, le=MAX_CREDITS)]
    models: Annotated[tuple[CatalogModel, ...], Field(min_length=1)]
    limits: TierLimits
    tenants: dict[UUID, TenantOverride] = {}
    alerts: Alerts = DEFAULT_ALERTS
    kill_switches: KillSwitches = KillSwitches()
    estimation: Estimation
    max_output_tokens_cap: TokenLimit
    max_images: Count
    tools: Tools
    # The one float of the policy; compared exactly, see domain/settlement.py.
    overshoot_tolerance: Annotated[float, Field(strict=True, ge=1.0, allow_inf_nan=False)]
    orphan_timeout_s: Seconds
    usage_grace_s: Seconds
    watchdog_interval_s: Seconds

    @model_validator(mode="after")
    def _catalog_rules(self) -> Policy:
        seen: set[str] = set()
        defaults: set[str] = set()
        for i, model in enumerate(self.models):
            if model.id in seen:
                raise _rule_error(f"models.{i}.id", f"duplicate model id {model.id!r}")
            seen.add(model.id)
            if model.default:
                if model.tier in defaults:
                    raise _rule_error(f"models.{i}.default", f"a second default model of tier {model.tier!r}")
                defaults.add(model.tier)
        return self

    @cached_property
    def _models_by_id(self) -> dict[str, CatalogModel]:
        return {m.id: m for m in self.models}

    def model_by_id(self, model_id: str) -> CatalogModel | None:
        return self._models_by_id.get(model_id)

    def limits_for(self, tenant_id: UUID) -> TierLimits:
        """The tier limits of a tenant: the policy's, with that tenant's overrides applied."""
        override = self.tenants.get(tenant_id)
        if override is None:
            return self.limits
        o = override.limits
        return TierLimits(
            standard=_merge(self.limits.standard, o.standard), premium=_merge(self.limits.premium, o.premium)
        )

    @cached_property
    def _alert_terms(self) -> dict[UUID, tuple[TierLimits, tuple[int, ...]]]:
        return {}

    def alert_terms(self, tenant_id: UUID) -> tuple[TierLimits, tuple[int, ...]]:
        """(limits, thresholds) of a tenant, built once per tenant: every settlement asks."""
        terms = self._alert_terms.get(tenant_id)
        if terms is None:
            terms = (self.limits_for(tenant_id), self.alerts_for(tenant_id).thresholds_percent)
            self._alert_terms[tenant_id] = terms
        return terms

    def alerts_for(self, tenant_id: UUID) -> Alerts:
        """The tenant's own `alerts` when its entry carries them, else the policy's."""
        override = self.tenants.get(tenant_id)
        if override is None or override.alerts is None:
            return self.alerts
        return override.alerts


def _merge(base: PeriodLimits, override: PeriodLimitsOverride) -> PeriodLimits:
    return PeriodLimits(
        daily=base.daily if override.daily is None else override.daily,
        monthly=base.monthly if override.monthly is None else override.monthly,
    )


def _rule_error(field: str, message: str) -> PydanticCustomError:
    # Cross-field rules are raised at model level; the dotted path rides in ctx for PolicyError.
    return PydanticCustomError("policy_rule", "{message}", {"message": message, "field": field})


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping key written twice (PyYAML would keep the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        keys: set[Hashable] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in keys:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"duplicate key {key!r}",
                    key_node.start_mark,
                )
            keys.add(key)
        return super().construct_mapping(node, deep=deep)


def load_policy(path: Path) -> Policy:
    """Read and validate a policy file. Any problem raises `PolicyError` naming the file and field."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(path, [("", f"cannot read: {exc}")]) from exc
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise PolicyError(path, [("", f"not valid YAML: {exc}")]) from exc
    if not isinstance(data, dict):
        raise PolicyError(path, [("", "the top level must be a mapping")])
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(path, _problems(exc)) from exc


def _problems(exc: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for err in exc.errors(include_url=False):
        field = ".".join(str(part) for part in err["loc"])
        if not field:
            field = str((err.get("ctx") or {}).get("field", ""))
        problems.append((field, err["msg"]))
    return problems


def policy_snapshot_json(policy: Policy) -> str:
    """Canonical JSON of a policy (sorted keys, compact): equal content gives equal text."""
    return json.dumps(_content(policy), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _content(policy: Policy) -> dict[str, Any]:
    """The policy as JSON data, without `alerts` where they are the default (the policy's) or
    absent (a tenant's): a version written before alerts existed keeps its digest, and reads back
    with the default."""
    data: dict[str, Any] = policy.model_dump(mode="json")
    if policy.alerts == DEFAULT_ALERTS:
        del data["alerts"]
    for tenant in data["tenants"].values():
        if tenant["alerts"] is None:
            del tenant["alerts"]
    return data


def policy_digest(policy: Policy) -> str:
    """sha256 hex of the canonical snapshot: storage keeps one snapshot per version and refuses a
    known version whose digest differs."""
    return hashlib.sha256(policy_snapshot_json(policy).encode("utf-8")).hexdigest()


def policy_from_snapshot(snapshot: str) -> Policy:
    """Rebuild the policy of a stored snapshot (the inverse of `policy_snapshot_json`)."""
    return Policy.model_validate_json(snapshot)
