-- Live ledger replicas (a heartbeat per lease round), so that each can aim for its fair
-- share of the partitions: ceil(partition count / live replicas).
CREATE TABLE ledger_replicas (
    owner      text        PRIMARY KEY,
    expires_at timestamptz NOT NULL
);
