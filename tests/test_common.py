"""Contracts in libs/common: partitioning, vault keys, settings, migrations, wire types."""

from __future__ import annotations

import hashlib
import re
from importlib import resources
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spendgate_common import events_v1, ledger_v1, subjects
from spendgate_common.errors import ConfigurationError, SpendgateError
from spendgate_common.limits import PARTITION_COUNT_MAX
from spendgate_common.migrate import load_migrations
from spendgate_common.partitioning import partition_for_tenant
from spendgate_common.settings import CommonSettings, Env, StreamSettings
from spendgate_common.vault_keys import (
    KEY_ID_CHARS,
    SECRET_CHARS,
    VaultKey,
    hash_secret,
    new_vault_key,
    parse_vault_key,
)
from spendgate_ledger import LedgerSettings

# ------------------------------------------------------------------------- partitioning

# Computed once from the documented formula,
# int.from_bytes(sha256(tenant)[:8], "big") % count, for counts 1, 8, 64 and 4096.
KNOWN_PARTITIONS = [
    ("acme", (0, 0, 32, 2208)),
    ("globex", (0, 7, 39, 4071)),
    ("initech", (0, 3, 3, 2819)),
    ("a", (0, 2, 10, 3530)),
    ("tenant-0042", (0, 3, 51, 2035)),
    ("zürich", (0, 0, 24, 2264)),
]


@pytest.mark.parametrize(("tenant", "expected"), KNOWN_PARTITIONS)
def test_partition_is_stable(tenant: str, expected: tuple[int, int, int, int]) -> None:
    counts = (1, 8, 64, 4096)
    assert tuple(partition_for_tenant(tenant, count) for count in counts) == expected


def _documented_partition(tenant: str, count: int) -> int:
    digest = hashlib.sha256(tenant.encode("utf-8")).digest()
    return int.from_bytes(digest[0:8], "big") % count


@given(st.text(max_size=40), st.integers(min_value=1, max_value=PARTITION_COUNT_MAX))
def test_partition_follows_the_documented_formula(tenant: str, count: int) -> None:
    partition = partition_for_tenant(tenant, count)
    assert 0 <= partition < count
    assert partition == _documented_partition(tenant, count)


def test_partitions_spread_tenants() -> None:
    used = {partition_for_tenant(f"tenant-{index}", 8) for index in range(200)}
    assert used == set(range(8))


# --------------------------------------------------------------------------- subjects


def test_subjects_carry_the_version() -> None:
    assert subjects.ledger_command_subject(5) == "spendgate.v1.ledger.5.cmd"
    assert subjects.events_subject(5) == "spendgate.v2.events.5"
    assert subjects.events_msg_id(5, 42, 47) == "5:42-47"
    assert subjects.events_v1_subject(5) == "spendgate.v1.events.5"
    assert subjects.event_v1_msg_id(5, 42) == "5:42"
    assert subjects.EVENTS_STREAM == "SPENDGATE_EVENTS"
    assert subjects.EVENTS_SUBJECTS == ["spendgate.v2.events.>", "spendgate.v1.events.>"]


# ------------------------------------------------------------------------- vault keys


def test_new_key_round_trips() -> None:
    key = new_vault_key("acme-prod")
    text = str(key)
    assert re.fullmatch(r"sgk_acme-prod_[a-z2-7]{16}_[a-z2-7]{32}", text), text
    assert len(key.key_id) == KEY_ID_CHARS
    assert len(key.secret) == SECRET_CHARS
    assert parse_vault_key(text) == key
    assert key.secret_sha256 == hashlib.sha256(key.secret.encode("ascii")).hexdigest()
    assert hash_secret(key.secret) == key.secret_sha256


def test_new_keys_are_random() -> None:
    keys = [new_vault_key("acme") for _ in range(50)]
    assert len({key.key_id for key in keys}) == 50
    assert len({key.secret for key in keys}) == 50


def test_parse_known_key() -> None:
    text = "sgk_t-1_abcdefghijklmnop_abcdefghijklmnopqrstuvwxyz234567"
    assert parse_vault_key(text) == VaultKey(
        "t-1", "abcdefghijklmnop", "abcdefghijklmnopqrstuvwxyz234567"
    )
    longest_tenant = "t" * 32
    assert parse_vault_key(text.replace("t-1", longest_tenant)) is not None


_KEY_ID = "abcdefghijklmnop"
_SECRET = "abcdefghijklmnopqrstuvwxyz234567"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "sgk",
        f"sgx_acme_{_KEY_ID}_{_SECRET}",  # wrong prefix
        f"SGK_acme_{_KEY_ID}_{_SECRET}",
        f"sk_acme_{_KEY_ID}_{_SECRET}",
        f"sgk_ACME_{_KEY_ID}_{_SECRET}",  # uppercase tenant
        f"sgk_acme_{_KEY_ID.upper()}_{_SECRET}",
        f"sgk_acme_{_KEY_ID}_{_SECRET.upper()}",
        f"sgk_acme_{_KEY_ID[:-1]}_{_SECRET}",  # key id too short
        f"sgk_acme_{_KEY_ID}q_{_SECRET}",  # key id too long
        f"sgk_acme_{_KEY_ID}_{_SECRET[:-1]}",  # secret too short
        f"sgk_acme_{_KEY_ID}_{_SECRET}a",  # secret too long
        f"sgk_ac_me_{_KEY_ID}_{_SECRET}",  # underscore in tenant
        f"sgk__{_KEY_ID}_{_SECRET}",  # empty tenant
        f"sgk_-acme_{_KEY_ID}_{_SECRET}",  # tenant must start with a letter or digit
        f"sgk_{'t' * 33}_{_KEY_ID}_{_SECRET}",  # tenant too long
        f"sgk_acme_{_KEY_ID}_{_SECRET}_extra",  # extra part
        f"x_sgk_acme_{_KEY_ID}_{_SECRET}",
        f"sgk_acme_{_KEY_ID}_{_SECRET[:-1]}1",  # 1 is not base32
        f"sgk_acme_{_KEY_ID}_{_SECRET[:-1]}=",
        f" sgk_acme_{_KEY_ID}_{_SECRET}",
        f"sgk_acme_{_KEY_ID}_{_SECRET} ",
        f"sgk_acmé_{_KEY_ID}_{_SECRET}",
    ],
)
def test_malformed_keys_are_none(text: str) -> None:
    assert parse_vault_key(text) is None


def test_key_with_trailing_newline_is_malformed() -> None:
    assert parse_vault_key(f"sgk_acme_{_KEY_ID}_{_SECRET}\n") is None


@given(st.from_regex(r"[a-z0-9][a-z0-9-]{0,31}", fullmatch=True))
def test_any_valid_tenant_round_trips(tenant: str) -> None:
    key = new_vault_key(tenant)
    assert parse_vault_key(str(key)) == key


# ---------------------------------------------------------------------------- settings


def test_required_variable_missing_names_it() -> None:
    with pytest.raises(ConfigurationError) as caught:
        Env({}).text("SPENDGATE_DATABASE_URL")
    assert caught.value.variable == "SPENDGATE_DATABASE_URL"
    assert "SPENDGATE_DATABASE_URL" in str(caught.value)
    assert isinstance(caught.value, SpendgateError)


@pytest.mark.parametrize("blank", ["", "   ", "\t"])
def test_blank_counts_as_missing(blank: str) -> None:
    with pytest.raises(ConfigurationError, match="SPENDGATE_DATABASE_URL"):
        LedgerSettings.from_env(Env({"SPENDGATE_DATABASE_URL": blank}))


def test_ledger_settings_require_the_database_url() -> None:
    with pytest.raises(ConfigurationError) as caught:
        LedgerSettings.from_env(Env({"SPENDGATE_NATS_URL": "nats://127.0.0.1:4222"}))
    assert caught.value.variable == "SPENDGATE_DATABASE_URL"


def test_ledger_settings_from_env() -> None:
    settings = LedgerSettings.from_env(
        Env(
            {
                "SPENDGATE_DATABASE_URL": " postgresql://u@db:5432/spendgate ",
                "SPENDGATE_NATS_URL": "nats://nats:4222",
                "SPENDGATE_PARTITION_COUNT": "8",
                "SPENDGATE_LEDGER_LEASE_MS": "1000",
                "SPENDGATE_LEDGER_OWNER_ID": "ledger-a",
                "UNRELATED": "ignored",
            }
        )
    )
    assert settings.database_url == "postgresql://u@db:5432/spendgate"
    assert settings.common == CommonSettings("nats://nats:4222", 8, StreamSettings())
    assert settings.owner_id == "ledger-a"
    assert settings.lease.total_seconds() == 1.0
    assert settings.hold_default.total_seconds() == 900


def test_owner_ids_default_to_unique_values() -> None:
    env = Env({"SPENDGATE_DATABASE_URL": "postgresql://db/x"})
    assert LedgerSettings.from_env(env).owner_id != LedgerSettings.from_env(env).owner_id


def test_env_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPENDGATE_PARTITION_COUNT", "12")
    assert CommonSettings.from_env(Env()).partition_count == 12
    monkeypatch.delenv("SPENDGATE_PARTITION_COUNT")
    assert CommonSettings.from_env(Env()).partition_count == 64


def test_env_refuses_unprefixed_names() -> None:
    with pytest.raises(AssertionError):
        Env({"DATABASE_URL": "x"}).text("DATABASE_URL")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(None, 64), ("1", 1), ("4096", 4096), (" 8 ", 8)],
)
def test_integer_within_bounds(raw: str | None, expected: int) -> None:
    environ = {} if raw is None else {"SPENDGATE_PARTITION_COUNT": raw}
    assert CommonSettings.from_env(Env(environ)).partition_count == expected


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("0", "between 1 and 4096, got 0"),
        ("4097", "between 1 and 4096, got 4097"),
        ("-3", "between 1 and 4096"),
        ("eight", "whole number"),
        ("8.0", "whole number"),
        ("0x10", "whole number"),
    ],
)
def test_integer_out_of_bounds(raw: str, problem: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        CommonSettings.from_env(Env({"SPENDGATE_PARTITION_COUNT": raw}))
    assert caught.value.variable == "SPENDGATE_PARTITION_COUNT"
    assert problem in caught.value.problem


def test_lease_bounds() -> None:
    base = {"SPENDGATE_DATABASE_URL": "postgresql://db/x"}
    with pytest.raises(ConfigurationError, match="SPENDGATE_LEDGER_LEASE_MS"):
        LedgerSettings.from_env(Env({**base, "SPENDGATE_LEDGER_LEASE_MS": "499"}))
    lease = LedgerSettings.from_env(Env({**base, "SPENDGATE_LEDGER_LEASE_MS": "500"})).lease
    assert lease.total_seconds() == 0.5


@pytest.mark.parametrize(
    "url", ["localhost:4222", "nats//host", "://host", "nats://", "nats://a b", "4222"]
)
def test_bad_url(url: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        CommonSettings.from_env(Env({"SPENDGATE_NATS_URL": url}))
    assert caught.value.variable == "SPENDGATE_NATS_URL"
    assert "URL" in caught.value.problem


def test_optional_url() -> None:
    assert Env({}).optional_url("SPENDGATE_OTLP_URL") is None
    assert Env({"SPENDGATE_OTLP_URL": "http://c:4318"}).optional_url("SPENDGATE_OTLP_URL")
    with pytest.raises(ConfigurationError, match="SPENDGATE_OTLP_URL"):
        Env({"SPENDGATE_OTLP_URL": "c:4318"}).optional_url("SPENDGATE_OTLP_URL")


def test_timezone() -> None:
    assert Env({}).timezone("SPENDGATE_TIMEZONE", "UTC") == "UTC"
    env = Env({"SPENDGATE_TIMEZONE": "America/New_York"})
    assert env.timezone("SPENDGATE_TIMEZONE", "UTC") == "America/New_York"


@pytest.mark.parametrize("zone", ["Mars/Olympus_Mons", "../etc/passwd", "/etc/localtime", "UTC/"])
def test_bad_timezone(zone: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Env({"SPENDGATE_TIMEZONE": zone}).timezone("SPENDGATE_TIMEZONE", "UTC")
    assert caught.value.variable == "SPENDGATE_TIMEZONE"
    assert "IANA" in caught.value.problem


@pytest.mark.parametrize("zone", ["America", "a" * 300])
def test_timezone_directory_or_long_name_is_a_configuration_error(zone: str) -> None:
    with pytest.raises(ConfigurationError, match="SPENDGATE_TIMEZONE"):
        Env({"SPENDGATE_TIMEZONE": zone}).timezone("SPENDGATE_TIMEZONE", "UTC")


# -------------------------------------------------------------------------- migrations


def test_migrations_load_in_order() -> None:
    migrations = load_migrations()
    assert [migration.version for migration in migrations] == list(range(1, len(migrations) + 1))
    assert len(migrations) >= 2
    assert migrations[0].name == "event_log"
    assert "CREATE TABLE events" in migrations[0].sql
    assert "PRIMARY KEY (partition, seq)" in migrations[0].sql
    shipped = sorted(
        entry.name
        for entry in resources.files("spendgate_common.migrations").iterdir()
        if entry.name.endswith(".sql")
    )
    assert [f"{m.version:04d}_{m.name}.sql" for m in migrations] == shipped
    assert all(migration.sql.strip() for migration in migrations)


# ------------------------------------------------------------------------- wire types

SHA = "ab" * 32

ALL_COMMANDS: list[ledger_v1.AnyCommand] = [
    ledger_v1.IssueKey(
        tenant="acme",
        key_id="k1",
        label="run-1",
        secret_sha256=SHA,
        cap_micros=1_000_000,
        window="daily",
        timezone="America/New_York",
        expires_at_ms=1_900_000_000_000,
    ),
    ledger_v1.Reserve(
        tenant="acme",
        key_id="k1",
        secret_sha256=SHA,
        amount_micros=180_000,
        vendor="openai",
        operation="POST /v1/chat/completions",
        idempotency_key="idem-1",
        hold_ms=30_000,
    ),
    ledger_v1.Reserve(
        tenant="acme",
        key_id="k1",
        secret_sha256=SHA,
        amount_micros=1,
        vendor="stripe",
        operation="",
    ),
    ledger_v1.Commit(
        tenant="acme", key_id="k1", secret_sha256=SHA, reservation_id="rsv_0_2", actual_micros=5
    ),
    ledger_v1.Release(
        tenant="acme", key_id="k1", secret_sha256=SHA, reservation_id="rsv_0_2", reason="4xx"
    ),
    ledger_v1.QueryKey(tenant="acme", key_id="k1"),
]

ALL_RESULTS: list[ledger_v1.AnyResult] = [
    ledger_v1.KeyCreated("k1", 1_900_000_000_000),
    ledger_v1.Granted("rsv_0_2", 180_000, 5, 0, 180_000, 1_000_000),
    ledger_v1.Granted("rsv_0_2", 180_000, 5, 0, 180_000, 1_000_000, replayed=True),
    ledger_v1.Denied("dcn_0_3", "cap_exhausted", "m", "key", "k1", 900_000, 0, 1_000_000, 180_000),
    ledger_v1.Settled("rsv_0_2", 100_000, 80_000),
    ledger_v1.KeyState("k1", "acme", "run-1", 1_000_000, "total", "UTC", 0, 1, 2, 3),
    ledger_v1.Failed("invalid_key", "the vault key is not valid"),
]

ALL_EVENTS: list[events_v1.AnyEvent] = [
    events_v1.KeyIssued(1, "k1", "acme", "run-1", SHA, 1_000_000, "total", "UTC", 2),
    events_v1.ReservationGranted(1, "rsv_0_2", "k1", 180_000, "openai", "op", None, SHA, 0, 9),
    events_v1.ReservationGranted(1, "rsv_0_3", "k1", 180_000, "openai", "op", "i", SHA, 0, 9),
    events_v1.ReservationDenied(
        at_ms=1,
        decision_id="dcn_0_4",
        key_id="k1",
        amount_micros=180_000,
        vendor="openai",
        operation="op",
        idempotency_key="i2",
        request_sha256=SHA,
        code="cap_exhausted",
        scope="key",
        scope_id="k1",
        committed_micros=900_000,
        reserved_micros=0,
        cap_micros=1_000_000,
        window_start_at_ms=0,
    ),
    events_v1.ReservationCommitted(1, "rsv_0_2", "k1", 180_000, 200_000, 0),
    events_v1.ReservationReleased(1, "rsv_0_3", "k1", 180_000, "vendor said 400"),
]


def test_command_batch_round_trip() -> None:
    batch = ledger_v1.CommandBatch(partition=3, commands=ALL_COMMANDS)
    data = ledger_v1.encode_batch(batch)
    assert ledger_v1.decode_command_batch(data) == batch
    assert msgspec.json.decode(data)["commands"][0]["type"] == "IssueKey"


def test_result_batch_round_trip() -> None:
    batch = ledger_v1.ResultBatch(results=ALL_RESULTS)
    decoded = ledger_v1.decode_result_batch(ledger_v1.encode_batch(batch))
    assert decoded == batch
    assert [type(result) for result in decoded.results] == [type(r) for r in ALL_RESULTS]
    assert msgspec.json.decode(ledger_v1.encode_batch(batch))["results"][-1] == {
        "type": "Failed",
        "code": "invalid_key",
        "message": "the vault key is not valid",
    }


@pytest.mark.parametrize("event", ALL_EVENTS, ids=lambda event: type(event).__name__)
def test_event_round_trip_and_canonical_bytes(event: events_v1.AnyEvent) -> None:
    body = events_v1.encode_event(event)
    decoded = events_v1.decode_event(body)
    assert decoded == event
    assert type(decoded) is type(event)
    assert events_v1.encode_event(decoded) == body
    assert body.startswith(b'{"type":"' + type(event).__name__.encode() + b'","at_ms":')


def test_events_are_frozen() -> None:
    event = ALL_EVENTS[0]
    with pytest.raises(AttributeError):
        event.at_ms = 5  # type: ignore[misc]


def _reserve_json(**changes: Any) -> dict[str, Any]:
    command: dict[str, Any] = {
        "type": "Reserve",
        "tenant": "acme",
        "key_id": "k1",
        "secret_sha256": SHA,
        "amount_micros": 180_000,
        "vendor": "openai",
        "operation": "op",
    }
    command.update(changes)
    return {"partition": 0, "commands": [command]}


def test_reserve_json_is_accepted() -> None:
    decoded = ledger_v1.decode_command_batch(msgspec.json.encode(_reserve_json()))
    assert decoded.commands[0] == ledger_v1.Reserve(
        tenant="acme",
        key_id="k1",
        secret_sha256=SHA,
        amount_micros=180_000,
        vendor="openai",
        operation="op",
    )


@pytest.mark.parametrize(
    "document",
    [
        _reserve_json(extra="x"),  # unknown field in a command
        _reserve_json(amount_micros=1.5),  # money is never a float
        _reserve_json(amount_micros=180_000.0),
        _reserve_json(amount_micros="180000"),
        _reserve_json(amount_micros=True),
        _reserve_json(key_id=7),
        _reserve_json(idempotency_key=5),
        _reserve_json(type="Spend"),  # unknown tag
        {**_reserve_json(), "extra": 1},  # unknown field in the batch
        {"partition": "0", "commands": []},
        {"partition": 0},
        {"commands": []},
        {"partition": 0, "commands": [{"tenant": "acme", "key_id": "k1"}]},  # no tag
        {
            "partition": 0,
            "commands": [
                {
                    "type": "IssueKey",
                    "tenant": "acme",
                    "key_id": "k1",
                    "label": "l",
                    "secret_sha256": SHA,
                    "cap_micros": 1,
                    "window": "weekly",
                    "timezone": "UTC",
                    "expires_at_ms": 1,
                }
            ],
        },
    ],
)
def test_malformed_commands_are_refused(document: dict[str, Any]) -> None:
    with pytest.raises(msgspec.ValidationError):
        ledger_v1.decode_command_batch(msgspec.json.encode(document))


@pytest.mark.parametrize("data", [b"", b"not json", b"{", b"[1, 2]", b"\xff\xfe"])
def test_undecodable_commands_are_refused(data: bytes) -> None:
    with pytest.raises(msgspec.DecodeError):
        ledger_v1.decode_command_batch(data)


_SETTLED_WITH_FLOAT = {
    "type": "Settled",
    "reservation_id": "r",
    "actual_micros": 1.0,
    "released_micros": 0,
}


@pytest.mark.parametrize(
    "document",
    [
        {"results": [{"type": "Failed", "code": "x", "message": "y", "extra": 1}]},
        {"results": [_SETTLED_WITH_FLOAT]},
        {"results": [{"type": "Unknown"}]},
        {"results": [], "partition": 1},
    ],
)
def test_malformed_results_are_refused(document: dict[str, Any]) -> None:
    with pytest.raises(msgspec.ValidationError):
        ledger_v1.decode_result_batch(msgspec.json.encode(document))


@pytest.mark.parametrize(
    "changes",
    [{"extra": 1}, {"cap_micros": 1.0}, {"window": "weekly"}, {"type": "KeyMinted"}],
)
def test_malformed_events_are_refused(changes: dict[str, Any]) -> None:
    document = msgspec.json.decode(events_v1.encode_event(ALL_EVENTS[0]))
    document.update(changes)
    with pytest.raises(msgspec.ValidationError):
        events_v1.decode_event(msgspec.json.encode(document))


def test_events_stream_settings_from_env() -> None:
    from datetime import timedelta

    from spendgate_common.errors import ConfigurationError

    settings = CommonSettings.from_env(
        Env(
            {
                "SPENDGATE_EVENTS_STREAM_REPLICAS": "3",
                "SPENDGATE_EVENTS_STREAM_MAX_AGE_SECONDS": "604800",
            }
        )
    )
    assert settings.events_stream == StreamSettings(3, timedelta(days=7))
    assert CommonSettings.from_env(Env({})).events_stream == StreamSettings(1, timedelta(0))
    with pytest.raises(ConfigurationError, match="SPENDGATE_EVENTS_STREAM_REPLICAS"):
        CommonSettings.from_env(Env({"SPENDGATE_EVENTS_STREAM_REPLICAS": "6"}))
