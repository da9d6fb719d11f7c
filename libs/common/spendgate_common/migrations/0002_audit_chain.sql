-- The auditor's hash chain: link(n) = SHA-256(link(n-1) || be32(partition) || be64(seq) || body).
CREATE TABLE audit_chain (
    partition integer NOT NULL,
    seq       bigint  NOT NULL,
    link      bytea   NOT NULL,
    PRIMARY KEY (partition, seq)
);

-- The head of each partition's chain; doubles as the auditor's consumer position, written
-- in the same transaction as the links it covers.
CREATE TABLE audit_heads (
    partition  integer     PRIMARY KEY,
    seq        bigint      NOT NULL,
    link       bytea       NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
