-- Shape of the audit tables checked by the database as well as by the auditor.
ALTER TABLE audit_chain
    ADD CONSTRAINT audit_chain_seq_positive CHECK (seq > 0),
    ADD CONSTRAINT audit_chain_link_sha256 CHECK (octet_length(link) = 32);
ALTER TABLE audit_heads
    ADD CONSTRAINT audit_heads_seq_not_negative CHECK (seq >= 0),
    ADD CONSTRAINT audit_heads_link_sha256 CHECK (octet_length(link) = 32);
