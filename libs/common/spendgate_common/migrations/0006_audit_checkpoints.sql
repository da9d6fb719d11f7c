-- Signed checkpoints of the audit chain (docs/audit.md, "Signed checkpoints").
-- The public half of every key the auditor has signed with, by key id, so that old
-- signatures stay verifiable after a rotation. The private key never reaches Postgres.
CREATE TABLE audit_signing_keys (
    key_id        text        PRIMARY KEY,
    algorithm     text        NOT NULL CHECK (algorithm = 'ed25519'),
    public_key    bytea       NOT NULL UNIQUE CHECK (octet_length(public_key) = 32),
    first_used_at timestamptz NOT NULL DEFAULT now()
);

-- An Ed25519 signature of (partition, seq, link). No foreign key to audit_signing_keys on
-- purpose: verification must be able to see, and report, a signature by an unknown key.
CREATE TABLE audit_checkpoints (
    partition integer     NOT NULL,
    seq       bigint      NOT NULL CHECK (seq > 0),
    link      bytea       NOT NULL CHECK (octet_length(link) = 32),
    key_id    text        NOT NULL,
    signature bytea       NOT NULL CHECK (octet_length(signature) = 64),
    signed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (partition, seq)
);
