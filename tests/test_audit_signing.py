"""Pure tests of signed checkpoints: the signed bytes, keys, the schedule, and verification
of a partition against checkpoints (forged, unknown key, rewritten chain, truncated log).

The vector below is in docs/audit.md; Ed25519 is deterministic, so the signature is too.
"""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from spendgate_auditor._chain import GENESIS_LINK, ChainHead, link
from spendgate_auditor._checkpoints import CheckpointSchedule
from spendgate_auditor._signing import (
    Signer,
    SigningKeyError,
    checkpoint_message,
    key_id_of,
    load_private_key,
    new_private_key_pem,
    parse_public_key,
    public_key_pem,
    verify_signature,
)
from spendgate_auditor._verifier import (
    CheckpointRow,
    HeadRow,
    PartitionReport,
    PartitionVerifier,
    ProblemKind,
)
from spendgate_auditor.verify import trusted_keys_of

# docs/audit.md, "Signed checkpoints": the seed is the bytes 0x00..0x1f.
SEED = bytes(range(32))
LINK_1 = bytes.fromhex("6a3f767b68ca664878538d60920c83db3c2049a7b3526ec41ba84ed540184fa0")
MESSAGE_HEX = (
    "7370656e64676174652d61756469742d636865636b706f696e742d763100"
    "00000007"
    "0000000000000001"
    "6a3f767b68ca664878538d60920c83db3c2049a7b3526ec41ba84ed540184fa0"
)
PUBLIC_KEY_HEX = "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8"
KEY_ID = "56475aa75463474c"
SIGNATURE_HEX = (
    "b5fc24a340f547b1d267a52886b2f3c09c69b7082fe02fa6c056b70d5ee2b106"
    "9beab19a6d5e93f0d4108761bab6ae4d570aab853661f75cbc3dcfddd884600f"
)


def signer() -> Signer:
    return Signer.of(Ed25519PrivateKey.from_private_bytes(SEED))


def test_checkpoint_message_and_signature_match_the_documented_vector() -> None:
    assert checkpoint_message(7, 1, LINK_1).hex() == MESSAGE_HEX
    key = signer()
    assert key.public_key.hex() == PUBLIC_KEY_HEX
    assert key.key_id == KEY_ID == key_id_of(bytes.fromhex(PUBLIC_KEY_HEX))
    signature = key.sign(7, 1, LINK_1)
    assert signature.hex() == SIGNATURE_HEX
    public = key.private_key.public_key()
    assert verify_signature(public, 7, 1, LINK_1, signature)
    # The signature binds the partition, the seq and the link.
    assert not verify_signature(public, 8, 1, LINK_1, signature)
    assert not verify_signature(public, 7, 2, LINK_1, signature)
    assert not verify_signature(public, 7, 1, bytes(32), signature)
    assert not verify_signature(public, -1, 1, LINK_1, signature)
    assert not verify_signature(public, 7, 1, LINK_1, signature[:-1])


def test_private_keys_load_from_pem_and_from_base64_seed() -> None:
    pem = new_private_key_pem()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = load_private_key(pem)
    assert isinstance(loaded, Ed25519PrivateKey)
    seed_b64 = base64.b64encode(SEED)
    assert Signer.of(load_private_key(b"  " + seed_b64 + b"\n")).key_id == KEY_ID
    for bad in (b"", b"not base64!", base64.b64encode(b"short"), b"-----BEGIN PRIVATE KEY-----"):
        with pytest.raises(SigningKeyError):
            load_private_key(bad)
    rsa_like = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    with pytest.raises(SigningKeyError):
        load_private_key(rsa_like)


def test_public_keys_parse_from_pem_and_base64() -> None:
    raw = bytes.fromhex(PUBLIC_KEY_HEX)
    assert parse_public_key(public_key_pem(raw)) == raw
    assert parse_public_key(base64.b64encode(raw).decode()) == raw
    with pytest.raises(SigningKeyError):
        parse_public_key(base64.b64encode(raw[:31]).decode())


# ------------------------------------------------------------------------------ schedule


def chain(partition: int, seqs: range) -> list[ChainHead]:
    head = ChainHead.genesis(partition) if seqs.start == 1 else None
    assert head is not None
    heads = []
    for seq in seqs:
        head = head.extend(seq, f"event {seq}".encode())
        heads.append(head)
    return heads


def test_schedule_signs_every_thousand_events_within_a_batch() -> None:
    schedule = CheckpointSchedule(every_events=1_000, interval_s=1.0)
    links = chain(3, range(1, 2_501))
    planned = schedule.plan(links, now_s=0.0)
    assert [head.seq for head in planned] == [1_000, 2_000]
    schedule.committed([links[-1]], planned, now_s=0.0)
    # Half a second later the tail is not due; a second later it is.
    assert schedule.due(0.5) == []
    assert schedule.next_due_in_s(0.5) == pytest.approx(0.5)
    assert schedule.due(1.0) == [3]
    schedule.signed([links[-1]])
    assert schedule.due(5.0) == []
    assert schedule.next_due_in_s(5.0) is None


def test_schedule_signs_a_batch_head_once_its_oldest_unsigned_event_is_old() -> None:
    schedule = CheckpointSchedule(every_events=1_000, interval_s=1.0)
    links = chain(0, range(1, 11))
    assert schedule.plan(links[:5], now_s=0.0) == []
    schedule.committed([links[4]], [], now_s=0.0)
    assert schedule.plan(links[5:8], now_s=0.4) == []
    schedule.committed([links[7]], [], now_s=0.4)
    assert schedule.plan(links[8:], now_s=1.2) == [links[-1]]


def test_schedule_after_a_restart_signs_unsigned_heads_at_once() -> None:
    schedule = CheckpointSchedule(every_events=1_000, interval_s=1.0)
    schedule.load({0: 10, 1: 5, 2: 0}, {0: 10, 1: 3}, now_s=100.0)
    assert schedule.due(100.0) == [1]
    assert schedule.unsigned() == [1]


# -------------------------------------------------------------------------- verification

BODIES = [f'{{"event":{seq}}}'.encode() for seq in range(1, 11)]


def links_of(partition: int, bodies: list[bytes]) -> list[bytes]:
    previous, links = GENESIS_LINK, []
    for seq, body in enumerate(bodies, start=1):
        previous = link(previous, partition, seq, body)
        links.append(previous)
    return links


def checkpoint(key: Signer, partition: int, seq: int, link_value: bytes) -> CheckpointRow:
    return CheckpointRow(seq, link_value, key.key_id, key.sign(partition, seq, link_value))


def run(
    bodies: list[bytes | None],
    links: list[bytes | None],
    checkpoints: dict[int, CheckpointRow],
    keys: list[Signer],
) -> PartitionReport:
    verifier = PartitionVerifier(1, trusted_keys_of([key.public_key for key in keys]))
    last = max(len(bodies), len(links), max(checkpoints, default=0))
    for seq in range(1, last + 1):
        body = bodies[seq - 1] if seq <= len(bodies) else None
        chained = links[seq - 1] if seq <= len(links) else None
        cp = checkpoints.get(seq)
        if body is None and chained is None and cp is None:
            continue
        verifier.observe(seq, body, chained, cp)
    last_link = next((value for value in reversed(links) if value is not None), None)
    chain_seq = max((i + 1 for i, value in enumerate(links) if value is not None), default=0)
    head = HeadRow(chain_seq, last_link) if last_link is not None else None
    return verifier.finish(head)


def test_verification_counts_verified_checkpoints() -> None:
    key = signer()
    links = links_of(1, BODIES)
    cps = {5: checkpoint(key, 1, 5, links[4]), 10: checkpoint(key, 1, 10, links[9])}
    report = run(list(BODIES), list(links), cps, [key])
    assert report.ok, report.problem
    assert (report.verified, report.signed_seq, report.checkpoints_verified) == (10, 10, 2)


def test_an_edited_event_with_a_rewritten_chain_is_caught_by_the_next_checkpoint() -> None:
    key = signer()
    links = links_of(1, BODIES)
    cps = {5: checkpoint(key, 1, 5, links[4]), 10: checkpoint(key, 1, 10, links[9])}
    edited = list(BODIES)
    edited[6] = b'{"event":"edited"}'
    rewritten = links_of(1, edited)  # the attacker recomputed every link after the edit
    report = run(list(edited), list(rewritten), cps, [key])
    assert report.problem is not None
    assert (report.problem.kind, report.problem.seq) == (ProblemKind.CHECKPOINT_MISMATCH, 10)
    assert report.signed_seq == 5


def test_a_forged_signature_is_caught() -> None:
    key = signer()
    links = links_of(1, BODIES)
    good = checkpoint(key, 1, 10, links[9])
    forged = CheckpointRow(10, links[9], key.key_id, bytes(64))
    report = run(list(BODIES), list(links), {10: forged}, [key])
    assert report.problem is not None
    assert (report.problem.kind, report.problem.seq) == (ProblemKind.BAD_SIGNATURE, 10)
    # A genuine signature moved to another seq does not verify either.
    moved = CheckpointRow(9, links[8], key.key_id, good.signature)
    report = run(list(BODIES), list(links), {9: moved}, [key])
    assert report.problem is not None
    assert report.problem.kind == ProblemKind.BAD_SIGNATURE


def test_a_signature_by_an_unknown_key_is_caught() -> None:
    trusted, stranger = signer(), Signer.generate_ephemeral()
    links = links_of(1, BODIES)
    report = run(list(BODIES), list(links), {10: checkpoint(stranger, 1, 10, links[9])}, [trusted])
    assert report.problem is not None
    assert (report.problem.kind, report.problem.seq) == (ProblemKind.UNKNOWN_SIGNING_KEY, 10)


def test_old_signatures_verify_after_a_key_rotation() -> None:
    old, new = signer(), Signer.generate_ephemeral()
    links = links_of(1, BODIES)
    cps = {5: checkpoint(old, 1, 5, links[4]), 10: checkpoint(new, 1, 10, links[9])}
    report = run(list(BODIES), list(links), cps, [old, new])
    assert report.ok
    assert report.checkpoints_verified == 2


def test_a_truncated_log_and_chain_are_caught_by_a_checkpoint_beyond_them() -> None:
    key = signer()
    links = links_of(1, BODIES)
    cps = {10: checkpoint(key, 1, 10, links[9])}
    # Events 9 and 10 deleted, and their chain rows and the head with them.
    report = run(list(BODIES[:8]), list(links[:8]), cps, [key])
    assert report.problem is not None
    assert (report.problem.kind, report.problem.seq) == (ProblemKind.TRUNCATED_TAIL, 10)


def test_a_checkpoint_is_checked_in_the_not_yet_audited_tail() -> None:
    key = signer()
    links = links_of(1, BODIES)
    cps = {8: checkpoint(key, 1, 8, links[7])}
    # Chain rows 6..10 missing at the end: lag, but the checkpoint at 8 still verifies.
    report = run(list(BODIES), list(links[:5]), cps, [key])
    assert report.ok, report.problem
    assert (report.verified, report.not_yet_audited, report.signed_seq) == (5, 5, 8)


def test_verification_from_a_trusted_checkpoint() -> None:
    key = signer()
    links = links_of(1, BODIES)
    verifier = PartitionVerifier(
        1, trusted_keys_of([key.public_key]), start_seq=6, previous=links[4]
    )
    for seq in range(6, 11):
        verifier.observe(seq, BODIES[seq - 1], links[seq - 1])
    report = verifier.finish(HeadRow(10, links[9]))
    assert report.ok
    assert (report.events, report.verified, report.signed_seq) == (5, 5, 5)
