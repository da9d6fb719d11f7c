-- Rollups, decisions and the finance outbox, written by the auditor in the same
-- transaction as the chain links of the events they come from (docs/finance.md).
-- Amounts are integer micro-USD (bigint); times of events are ms since the epoch as the
-- ledger recorded them (at_ms); days are local dates in the key's (or budget's) zone.

-- What the auditor learned from KeyIssued / KeyRevoked.
CREATE TABLE audit_keys (
    partition     integer NOT NULL,
    key_id        text    NOT NULL,
    tenant        text    NOT NULL,
    label         text    NOT NULL,
    fleet_labels  text[]  NOT NULL,
    timezone      text    NOT NULL,
    "window"      text    NOT NULL,
    cap_micros    bigint  NOT NULL,
    issued_at_ms  bigint  NOT NULL,
    expires_at_ms bigint  NOT NULL,
    revoked_at_ms bigint,
    PRIMARY KEY (partition, key_id)
);
CREATE INDEX audit_keys_tenant_label ON audit_keys (tenant, label);

-- What the auditor learned from BudgetCreated / BudgetUpdated / BudgetClosed.
CREATE TABLE audit_budgets (
    partition     integer NOT NULL,
    tenant        text    NOT NULL,
    budget_id     text    NOT NULL,
    scope         text    NOT NULL,
    match         text    NOT NULL,
    timezone      text    NOT NULL,
    "window"      text    NOT NULL,
    cap_micros    bigint  NOT NULL,
    created_at_ms bigint  NOT NULL,
    closed_at_ms  bigint,
    PRIMARY KEY (partition, tenant, budget_id)
);

-- One row per reserve decision: a grant (decision_id = reservation id; outcome open until
-- it settles) or a denial (decision_id = the denial's decision id).
CREATE TABLE audit_decisions (
    partition       integer NOT NULL,
    decision_id     text    NOT NULL,
    key_id          text    NOT NULL,
    vendor          text    NOT NULL,
    operation       text    NOT NULL,
    outcome         text    NOT NULL
        CHECK (outcome IN ('open', 'committed', 'released', 'expired', 'denied')),
    amount_micros   bigint  NOT NULL,
    spent_micros    bigint  NOT NULL DEFAULT 0,
    overrun_micros  bigint  NOT NULL DEFAULT 0,
    budget_ids      text[]  NOT NULL,
    decided_at_ms   bigint  NOT NULL,
    decided_seq     bigint  NOT NULL,
    settled_at_ms   bigint,
    settled_seq     bigint,
    denial_code     text,
    denial_scope    text,
    denial_scope_id text,
    PRIMARY KEY (partition, decision_id)
);
CREATE INDEX audit_decisions_key ON audit_decisions (partition, key_id, decided_seq);

-- Per key, vendor and day (in the key's time zone).
CREATE TABLE audit_rollups (
    partition        integer NOT NULL,
    key_id           text    NOT NULL,
    vendor           text    NOT NULL,
    day              date    NOT NULL,
    tenant           text    NOT NULL,
    label            text    NOT NULL,
    granted_count    bigint  NOT NULL DEFAULT 0,
    granted_micros   bigint  NOT NULL DEFAULT 0,
    reserved_micros  bigint  NOT NULL DEFAULT 0,
    committed_count  bigint  NOT NULL DEFAULT 0,
    committed_micros bigint  NOT NULL DEFAULT 0,
    released_count   bigint  NOT NULL DEFAULT 0,
    released_micros  bigint  NOT NULL DEFAULT 0,
    expired_count    bigint  NOT NULL DEFAULT 0,
    expired_micros   bigint  NOT NULL DEFAULT 0,
    overrun_count    bigint  NOT NULL DEFAULT 0,
    overrun_micros   bigint  NOT NULL DEFAULT 0,
    denied_count     bigint  NOT NULL DEFAULT 0,
    denied_micros    bigint  NOT NULL DEFAULT 0,
    PRIMARY KEY (partition, key_id, vendor, day)
);
CREATE INDEX audit_rollups_tenant_day ON audit_rollups (tenant, day);

-- Per budget and day (in the budget's time zone).
CREATE TABLE audit_budget_rollups (
    partition        integer NOT NULL,
    tenant           text    NOT NULL,
    budget_id        text    NOT NULL,
    day              date    NOT NULL,
    granted_count    bigint  NOT NULL DEFAULT 0,
    granted_micros   bigint  NOT NULL DEFAULT 0,
    reserved_micros  bigint  NOT NULL DEFAULT 0,
    committed_count  bigint  NOT NULL DEFAULT 0,
    committed_micros bigint  NOT NULL DEFAULT 0,
    released_count   bigint  NOT NULL DEFAULT 0,
    released_micros  bigint  NOT NULL DEFAULT 0,
    expired_count    bigint  NOT NULL DEFAULT 0,
    expired_micros   bigint  NOT NULL DEFAULT 0,
    overrun_count    bigint  NOT NULL DEFAULT 0,
    overrun_micros   bigint  NOT NULL DEFAULT 0,
    denied_count     bigint  NOT NULL DEFAULT 0,
    denied_micros    bigint  NOT NULL DEFAULT 0,
    PRIMARY KEY (partition, tenant, budget_id, day)
);

-- Finance events (CloudEvents JSON) committed with their source event, published to
-- JetStream after the commit and deleted once JetStream acknowledged them.
CREATE TABLE audit_finance_outbox (
    partition integer NOT NULL,
    seq       bigint  NOT NULL,
    tenant    text    NOT NULL,
    body      bytea   NOT NULL,
    PRIMARY KEY (partition, seq)
);

-- Finance views (docs/finance.md). Every *_micros column is integer micro-USD.
CREATE VIEW finance_key_daily AS
SELECT tenant, key_id, label, vendor, day,
       granted_count, granted_micros, reserved_micros, committed_count, committed_micros,
       released_count, released_micros, expired_count, expired_micros,
       overrun_count, overrun_micros, denied_count, denied_micros
FROM audit_rollups;

CREATE VIEW finance_run_daily AS
SELECT tenant, label, day,
       sum(granted_count)::bigint    AS granted_count,
       sum(granted_micros)::bigint   AS granted_micros,
       sum(reserved_micros)::bigint  AS reserved_micros,
       sum(committed_count)::bigint  AS committed_count,
       sum(committed_micros)::bigint AS committed_micros,
       sum(released_micros)::bigint  AS released_micros,
       sum(expired_micros)::bigint   AS expired_micros,
       sum(overrun_micros)::bigint   AS overrun_micros,
       sum(denied_count)::bigint     AS denied_count,
       sum(denied_micros)::bigint    AS denied_micros
FROM audit_rollups
GROUP BY tenant, label, day;

CREATE VIEW finance_fleet_daily AS
SELECT r.tenant, fleet.label AS fleet_label, r.day,
       sum(r.granted_count)::bigint    AS granted_count,
       sum(r.granted_micros)::bigint   AS granted_micros,
       sum(r.reserved_micros)::bigint  AS reserved_micros,
       sum(r.committed_count)::bigint  AS committed_count,
       sum(r.committed_micros)::bigint AS committed_micros,
       sum(r.released_micros)::bigint  AS released_micros,
       sum(r.expired_micros)::bigint   AS expired_micros,
       sum(r.overrun_micros)::bigint   AS overrun_micros,
       sum(r.denied_count)::bigint     AS denied_count,
       sum(r.denied_micros)::bigint    AS denied_micros
FROM audit_rollups AS r
JOIN audit_keys AS k ON k.partition = r.partition AND k.key_id = r.key_id
CROSS JOIN LATERAL unnest(k.fleet_labels) AS fleet(label)
GROUP BY r.tenant, fleet.label, r.day;

CREATE VIEW finance_vendor_daily AS
SELECT tenant, vendor, day,
       sum(granted_count)::bigint    AS granted_count,
       sum(granted_micros)::bigint   AS granted_micros,
       sum(reserved_micros)::bigint  AS reserved_micros,
       sum(committed_count)::bigint  AS committed_count,
       sum(committed_micros)::bigint AS committed_micros,
       sum(released_micros)::bigint  AS released_micros,
       sum(expired_micros)::bigint   AS expired_micros,
       sum(overrun_micros)::bigint   AS overrun_micros,
       sum(denied_count)::bigint     AS denied_count,
       sum(denied_micros)::bigint    AS denied_micros
FROM audit_rollups
GROUP BY tenant, vendor, day;

CREATE VIEW finance_tenant_daily AS
SELECT tenant, day,
       sum(granted_count)::bigint    AS granted_count,
       sum(granted_micros)::bigint   AS granted_micros,
       sum(reserved_micros)::bigint  AS reserved_micros,
       sum(committed_count)::bigint  AS committed_count,
       sum(committed_micros)::bigint AS committed_micros,
       sum(released_micros)::bigint  AS released_micros,
       sum(expired_micros)::bigint   AS expired_micros,
       sum(overrun_micros)::bigint   AS overrun_micros,
       sum(denied_count)::bigint     AS denied_count,
       sum(denied_micros)::bigint    AS denied_micros
FROM audit_rollups
GROUP BY tenant, day;

CREATE VIEW finance_budget_daily AS
SELECT r.tenant, r.budget_id, b.scope, b.match, b.timezone, b."window", b.cap_micros,
       r.day, r.granted_count, r.granted_micros, r.reserved_micros, r.committed_count,
       r.committed_micros, r.released_count, r.released_micros, r.expired_count,
       r.expired_micros, r.overrun_count, r.overrun_micros, r.denied_count, r.denied_micros
FROM audit_budget_rollups AS r
JOIN audit_budgets AS b
  ON b.partition = r.partition AND b.tenant = r.tenant AND b.budget_id = r.budget_id;

CREATE VIEW finance_decisions AS
SELECT d.partition, d.decision_id, k.tenant, d.key_id, k.label, k.fleet_labels, d.vendor,
       d.operation, d.outcome, d.amount_micros, d.spent_micros, d.overrun_micros,
       d.budget_ids,
       to_timestamp(d.decided_at_ms / 1000.0) AS decided_at,
       to_timestamp(d.settled_at_ms / 1000.0) AS settled_at,
       d.decided_seq, d.settled_seq, d.denial_code, d.denial_scope, d.denial_scope_id
FROM audit_decisions AS d
JOIN audit_keys AS k ON k.partition = d.partition AND k.key_id = d.key_id;
