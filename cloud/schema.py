"""The cloud's tables, written once for both dialects (``{blob}`` and ``{int}`` differ).

Money columns are BIGINT micros; amounts are <= 2^53 and balances stay far inside 2^63.
The schema's version is kept in ``meta`` (``schema_version``): ``create`` writes it into a new
database and refuses a database written by a newer fogpay before it touches anything else, so
an older binary started by mistake cannot book into tables it does not understand.
"""

from typing import Final

from cloud.store import Tx
from protocol.errors import FogpayError

SCHEMA_VERSION: Final = 1
VERSION_KEY: Final = "schema_version"


class SchemaError(FogpayError):
    """The database cannot be used by this fogpay (written by a newer one, or damaged)."""


TABLES: Final = (
    "CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS owners (
        owner_id TEXT PRIMARY KEY, key {blob} NOT NULL UNIQUE, name TEXT NOT NULL,
        limit_micros {int} NOT NULL,
        currency TEXT NOT NULL, funding_ref TEXT NOT NULL, status TEXT NOT NULL,
        nb {int} NOT NULL, na {int} NOT NULL, credential {blob} NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS fogs (
        fog_id TEXT PRIMARY KEY, key {blob} NOT NULL UNIQUE, credential {blob} NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS bindings (
        binding_id {blob} PRIMARY KEY, device {blob} NOT NULL, owner_id TEXT NOT NULL,
        nb {int} NOT NULL, na {int} NOT NULL, currency TEXT NOT NULL, envelope {blob} NOT NULL,
        registered_ms {int} NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS bindings_device ON bindings (device)",
    """CREATE TABLE IF NOT EXISTS revocations (
        key {blob} PRIMARY KEY, signer {blob} NOT NULL, time_ms {int} NOT NULL,
        reason TEXT NOT NULL, envelope {blob} NOT NULL)""",
    "CREATE TABLE IF NOT EXISTS retained (topic TEXT PRIMARY KEY, payload {blob} NOT NULL)",
    """CREATE TABLE IF NOT EXISTS leases (
        lease_id {blob} PRIMARY KEY, owner_id TEXT NOT NULL, fog_id TEXT NOT NULL,
        currency TEXT NOT NULL, amount_micros {int} NOT NULL, not_after_ms {int} NOT NULL,
        granted_ms {int} NOT NULL, state TEXT NOT NULL, drawn_micros {int} NOT NULL,
        reported_micros {int}, report_batch {int}, envelope {blob} NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS leases_owner ON leases (owner_id, state)",
    # peer transfers (docs/protocol.md 18.2): a sub-lease carved from a parent lease
    """CREATE TABLE IF NOT EXISTS peer_transfers (
        transfer_id {blob} PRIMARY KEY, parent_id {blob} NOT NULL, giver TEXT NOT NULL,
        receiver TEXT NOT NULL, owner_id TEXT NOT NULL, amount_micros {int} NOT NULL,
        envelope {blob} NOT NULL, time_ms {int} NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS peer_transfers_parent ON peer_transfers (parent_id)",
    """CREATE TABLE IF NOT EXISTS lease_requests (
        request_id {blob} PRIMARY KEY, fog_id TEXT NOT NULL, owner_id TEXT NOT NULL,
        lease_id {blob})""",
    """CREATE TABLE IF NOT EXISTS chains (
        fog_id TEXT PRIMARY KEY, number {int} NOT NULL, header_id {blob} NOT NULL,
        next_index {int} NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS batches (
        fog_id TEXT NOT NULL, number {int} NOT NULL, header_id {blob} NOT NULL,
        header {blob} NOT NULL, first_index {int} NOT NULL, count {int} NOT NULL,
        received_ms {int} NOT NULL, PRIMARY KEY (fog_id, number))""",
    """CREATE TABLE IF NOT EXISTS held (
        fog_id TEXT NOT NULL, number {int} NOT NULL, header_id {blob} NOT NULL,
        wire {blob} NOT NULL, PRIMARY KEY (fog_id, number))""",
    """CREATE TABLE IF NOT EXISTS records (
        fog_id TEXT NOT NULL, number {int} NOT NULL, position {int} NOT NULL,
        intent_id {blob} NOT NULL, record {blob} NOT NULL,
        PRIMARY KEY (fog_id, number, position))""",
    """CREATE TABLE IF NOT EXISTS transfers (
        intent_id {blob} PRIMARY KEY, device {blob} NOT NULL, dseq {blob} NOT NULL,
        debit TEXT NOT NULL, credit TEXT NOT NULL, currency TEXT NOT NULL,
        amount_micros {int} NOT NULL, lease_id {blob} NOT NULL, fog_id TEXT NOT NULL,
        number {int} NOT NULL, position {int} NOT NULL, booked_ms {int} NOT NULL,
        period TEXT)""",
    "CREATE INDEX IF NOT EXISTS transfers_dseq ON transfers (dseq)",
    "CREATE INDEX IF NOT EXISTS transfers_lease ON transfers (lease_id)",
    "CREATE INDEX IF NOT EXISTS transfers_period ON transfers (period, debit)",
    """CREATE TABLE IF NOT EXISTS held_records (
        intent_id {blob} PRIMARY KEY, fog_id TEXT NOT NULL, device {blob} NOT NULL,
        record {blob} NOT NULL, received_ms {int} NOT NULL)""",
    # device-to-device payments (docs/protocol.md 18.3, cloud/vouchers.py)
    """CREATE TABLE IF NOT EXISTS vouchers (
        voucher_id {blob} PRIMARY KEY, owner_id TEXT NOT NULL, device {blob} NOT NULL,
        fog_id TEXT NOT NULL, currency TEXT NOT NULL, amount_micros {int} NOT NULL,
        spent_micros {int} NOT NULL, not_after_ms {int} NOT NULL, first_ms {int} NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS voucher_payments (
        payment_id {blob} PRIMARY KEY, voucher_id {blob} NOT NULL, seq {int} NOT NULL,
        payee TEXT NOT NULL, currency TEXT NOT NULL, amount_micros {int} NOT NULL,
        device {blob} NOT NULL, record {blob} NOT NULL, booked_ms {int} NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS voucher_payments_seq ON voucher_payments (voucher_id, seq)",
    """CREATE TABLE IF NOT EXISTS voucher_returns (
        voucher_id {blob} PRIMARY KEY, owner_id TEXT NOT NULL, currency TEXT NOT NULL,
        amount_micros {int} NOT NULL, returned_ms {int} NOT NULL)""",
    # rebalancing (docs/protocol.md 18.5): when the cloud last asked a fog to give a lease back
    """CREATE TABLE IF NOT EXISTS lease_recalls (
        lease_id {blob} PRIMARY KEY, asked_ms {int} NOT NULL)""",
    # which escrow moves (d2d payments, returned escrow) a settlement period paid out
    """CREATE TABLE IF NOT EXISTS escrow_settled (
        kind TEXT NOT NULL, ref {blob} NOT NULL, period TEXT NOT NULL,
        PRIMARY KEY (kind, ref))""",
    """CREATE TABLE IF NOT EXISTS accounts (
        account_id TEXT NOT NULL, currency TEXT NOT NULL, balance_micros {int} NOT NULL,
        PRIMARY KEY (account_id, currency))""",
    """CREATE TABLE IF NOT EXISTS rejected (
        fog_id TEXT NOT NULL, number {int} NOT NULL, position {int} NOT NULL,
        intent_id {blob}, reason TEXT NOT NULL, PRIMARY KEY (fog_id, number, position))""",
    """CREATE TABLE IF NOT EXISTS alarms (
        kind TEXT NOT NULL, subject TEXT NOT NULL, fog_id TEXT NOT NULL, detail TEXT NOT NULL,
        time_ms {int} NOT NULL, PRIMARY KEY (kind, subject))""",
    """CREATE TABLE IF NOT EXISTS lease_reports (
        lease_id {blob} PRIMARY KEY, fog_id TEXT NOT NULL, drawn_micros {int} NOT NULL,
        batch {int} NOT NULL, envelope {blob} NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS periods (
        period_id TEXT PRIMARY KEY, until_ms {int} NOT NULL, created_ms {int} NOT NULL,
        report TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS carries (
        owner_id TEXT NOT NULL, currency TEXT NOT NULL, charge_micros {int} NOT NULL,
        payout_micros {int} NOT NULL, PRIMARY KEY (owner_id, currency))""",
    """CREATE TABLE IF NOT EXISTS settlement_lines (
        line_id TEXT PRIMARY KEY, period_id TEXT NOT NULL, kind TEXT NOT NULL,
        owner_id TEXT NOT NULL, currency TEXT NOT NULL, micros {int} NOT NULL,
        rail TEXT NOT NULL, note TEXT NOT NULL)""",
)


def ddl(*, blob: str, integer: str) -> list[str]:
    return [t.format(blob=blob, int=integer) for t in TABLES]


async def create(tx: Tx, *, blob: str, integer: str) -> None:
    """Check the database's schema version, then create what is missing.

    A database without a version row predates the row and holds version 1, the first (every
    table is ``IF NOT EXISTS``): it gets the row. Raises SchemaError, changing nothing, for a
    version this fogpay does not know (newer) or a row that is not a version."""
    meta, *tables = ddl(blob=blob, integer=integer)
    await tx.execute(meta)
    row = await tx.fetchone("SELECT v FROM meta WHERE k = ?", (VERSION_KEY,))
    if row is not None:
        text = str(row[0])
        if not (text.isascii() and text.isdigit()) or int(text) < 1:
            raise SchemaError(f"meta.{VERSION_KEY} is {text!r}, not a schema version")
        if (version := int(text)) > SCHEMA_VERSION:
            raise SchemaError(
                f"the database has schema version {version}; this fogpay knows versions up "
                f"to {SCHEMA_VERSION}: run the fogpay that wrote it (or a newer one)"
            )
    for stmt in tables:
        await tx.execute(stmt)
    if row is None:
        await tx.execute(
            "INSERT INTO meta (k, v) VALUES (?, ?)", (VERSION_KEY, str(SCHEMA_VERSION))
        )
