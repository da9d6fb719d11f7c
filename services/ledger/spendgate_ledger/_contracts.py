"""Contracts: a tenant's rules, in CEL, evaluated by the ledger on every reserve of the tenant.

A rule says what to do *before* a cap is reached: ``allow``, ``stop``,
``require_approval`` or ``degrade``. Every rule whose ``when`` is true matches; the most
restrictive decision wins (stop > require_approval > degrade > allow), the first such
rule in the set names it. Expressions are compiled once, when the set is uploaded (a
rule that does not parse, uses an unknown variable, or is not a bool on a sample request
refuses the whole set with its name, position and message), and again when a replica
rebuilds its state. CEL, not Python: an expression cannot loop, call out, or touch
anything but the two maps it is given (docs/decisions.md, "Contracts in CEL").

An expression that fails at evaluation time (a type error on a real request) counts as
a match: with money at stake a broken rule fails closed, and the denial names the rule.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import cel

from spendgate_common.events_v1 import ContractDecision, ContractRule
from spendgate_common.ledger_v1 import Failed
from spendgate_common.money import MICROS_PER_USD

RULES_PER_TENANT_MAX = 64
EXPRESSION_CHARS_MAX = 2_000
MESSAGE_CHARS_MAX = 500
APPROVAL_TTL_SECONDS_MAX = 7 * 86_400
RULE_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
VARIABLES = frozenset({"request", "budget"})
RANK: dict[ContractDecision, int] = {"allow": 0, "degrade": 1, "require_approval": 2, "stop": 3}


def evaluation_context(
    *,
    vendor: str,
    operation: str,
    amount_micros: int,
    model: str,
    key_id: str,
    key_label: str,
    fleet_labels: Sequence[str],
    scope: str,
    scope_id: str,
    cap_micros: int,
    spent_micros: int,
    reserved_micros: int,
) -> dict[str, object]:
    """The ``request`` and ``budget`` maps a rule sees (docs/contracts.md)."""
    remaining = max(0, cap_micros - spent_micros - reserved_micros)
    return {
        "request": {
            "vendor": vendor,
            "operation": operation,
            "amount_micros": amount_micros,
            "amount_usd": amount_micros / MICROS_PER_USD,
            "model": model,
            "key_id": key_id,
            "key_label": key_label,
            "fleet_labels": list(fleet_labels),
        },
        "budget": {
            "scope": scope,
            "scope_id": scope_id,
            "cap_micros": cap_micros,
            "spent_micros": spent_micros,
            "reserved_micros": reserved_micros,
            "remaining_micros": remaining,
            "cap_usd": cap_micros / MICROS_PER_USD,
            "spent_usd": spent_micros / MICROS_PER_USD,
            "reserved_usd": reserved_micros / MICROS_PER_USD,
            "remaining_usd": remaining / MICROS_PER_USD,
            "percent_used": 100.0 * (spent_micros + reserved_micros) / cap_micros,
        },
    }


# A request and budget with every field set, to type-check a rule at upload.
SAMPLE_CONTEXT = evaluation_context(
    vendor="openai",
    operation="POST /v1/chat/completions",
    amount_micros=1_000_000,
    model="gpt-4o",
    key_id="sample",
    key_label="fleet-a/run-1",
    fleet_labels=["fleet-a"],
    scope="key",
    scope_id="sample",
    cap_micros=10_000_000,
    spent_micros=1_000_000,
    reserved_micros=1_000_000,
)


@dataclass(frozen=True, slots=True)
class CompiledRule:
    rule: ContractRule
    program: cel.Program


@dataclass(frozen=True, slots=True)
class TenantContracts:
    version: int
    rules: tuple[CompiledRule, ...]
    source_sha256: str
    set_at_ms: int


def compile_rules(rules: Sequence[ContractRule]) -> tuple[CompiledRule, ...] | Failed:
    """Compile and check a whole set; the first problem refuses it (nothing is applied)."""
    if len(rules) > RULES_PER_TENANT_MAX:
        return _invalid(f"at most {RULES_PER_TENANT_MAX} rules per tenant")
    names: set[str] = set()
    compiled: list[CompiledRule] = []
    for index, rule in enumerate(rules):
        where = f"rule {index + 1} ({rule.name!r})"
        problem = _rule_problem(rule)
        if problem is not None:
            return _invalid(f"{where}: {problem}")
        if rule.name in names:
            return _invalid(f"{where}: the name is used twice")
        names.add(rule.name)
        try:
            program = cel.compile(rule.when)
        except ValueError as error:
            return _invalid(f"{where}: {error}")
        unknown = set(program.variables()) - VARIABLES
        if unknown:
            return _invalid(
                f"{where}: unknown variable(s) {sorted(unknown)}; use request.* and budget.*"
            )
        try:
            sample = program.execute(SAMPLE_CONTEXT)
        except Exception as error:
            return _invalid(f"{where}: does not evaluate on a sample request: {error}")
        if not isinstance(sample, bool):
            return _invalid(f"{where}: must be a bool, is {type(sample).__name__}")
        compiled.append(CompiledRule(rule, program))
    return tuple(compiled)


def decide(rules: Sequence[CompiledRule], context: Mapping[str, object]) -> ContractRule | None:
    """The most restrictive matching rule (None when none matches or the best is allow)."""
    best: ContractRule | None = None
    for compiled in rules:
        try:
            matched = compiled.program.execute(dict(context)) is True
        except Exception:
            matched = True
        if matched and (best is None or RANK[compiled.rule.decision] > RANK[best.decision]):
            best = compiled.rule
    return None if best is None or best.decision == "allow" else best


def _rule_problem(rule: ContractRule) -> str | None:
    if not RULE_NAME_PATTERN.fullmatch(rule.name):
        return "name must be 1 to 64 of a-z, 0-9, '.', '_' and '-'"
    if not 0 < len(rule.when) <= EXPRESSION_CHARS_MAX:
        return f"'when' must be 1 to {EXPRESSION_CHARS_MAX} characters"
    if len(rule.message) > MESSAGE_CHARS_MAX:
        return f"'message' is longer than {MESSAGE_CHARS_MAX} characters"
    if not 60 <= rule.approval_ttl_seconds <= APPROVAL_TTL_SECONDS_MAX:
        return f"approval_ttl_seconds must be 60 to {APPROVAL_TTL_SECONDS_MAX}"
    if rule.degrade_model is not None and rule.decision != "degrade":
        return "degrade_model applies only to decision 'degrade'"
    if rule.degrade_model is not None and not 0 < len(rule.degrade_model) <= 100:
        return "degrade_model must be 1 to 100 characters"
    return None


def _invalid(message: str) -> Failed:
    return Failed("invalid_contract", message)
