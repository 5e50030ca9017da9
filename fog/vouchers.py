"""Vouchers for device-to-device payments, the fog's part (docs/protocol.md 18.3).

An intent to the reserved payee ``voucher`` is authorized like any other (section 13: drawn
from a lease, logged, batched; the cloud books it as the owner's payment into the voucher
escrow). Once its receipt is ``ok``, the fog also publishes, on the same receipt topic and
right after the receipt, the ``vch`` it signs for it (``protocol.voucher.voucher_for``). The
voucher is a pure function of the log record, so nothing more is stored: a retransmitted
voucher intent gets its stored receipt again and the same voucher bytes after it.
"""

import nacl.signing

from protocol.voucher import voucher_for


class VoucherIssuer:
    """Makes the ``vch`` that follows an ok receipt of a voucher intent."""

    def __init__(self, fog_key: nacl.signing.SigningKey) -> None:
        self._key = fog_key

    def voucher(self, intent: bytes, receipt: bytes) -> bytes | None:
        """The ``vch`` envelope to publish after ``receipt`` (the plain receipt envelope, as
        logged), or None when ``intent`` is not an authorized voucher intent."""
        return voucher_for(intent, receipt, self._key)
