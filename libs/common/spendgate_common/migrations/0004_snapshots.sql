-- Partition state snapshots: recovery loads the newest one at or below the lease's
-- last_seq and replays only the events after it.
CREATE TABLE snapshots (
    partition  integer     NOT NULL,
    seq        bigint      NOT NULL CHECK (seq > 0),
    created_at timestamptz NOT NULL DEFAULT now(),
    body       bytea       NOT NULL,
    PRIMARY KEY (partition, seq)
);
