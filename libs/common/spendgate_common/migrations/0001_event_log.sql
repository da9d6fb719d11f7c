-- The ledger's event log: one ordered log per partition, the single source of truth.
-- body holds the event's canonical bytes (events_v1.encode_event), byte for byte.
CREATE TABLE events (
    partition   integer     NOT NULL,
    seq         bigint      NOT NULL CHECK (seq > 0),
    epoch       bigint      NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    type        text        NOT NULL,
    body        bytea       NOT NULL,
    PRIMARY KEY (partition, seq)
);

-- One lease row per partition. Every append updates last_seq under the owner's epoch,
-- so a stale owner's write matches no row and fails (fencing), and order is checked
-- here as well as by the primary key.
CREATE TABLE partition_leases (
    partition  integer     PRIMARY KEY,
    owner      text,
    epoch      bigint      NOT NULL DEFAULT 0,
    expires_at timestamptz NOT NULL DEFAULT 'epoch',
    last_seq   bigint      NOT NULL DEFAULT 0
);

-- The event log is the outbox: the relay publishes to JetStream from this watermark.
CREATE TABLE outbox_watermarks (
    partition     integer PRIMARY KEY,
    published_seq bigint  NOT NULL DEFAULT 0
);
