"""MLflow webhook signatures: ``X-MLflow-Signature: v1,<base64 HMAC-SHA256>``.

MLflow signs ``"{delivery_id}.{timestamp}.{body}"`` with the webhook's secret (the body exactly
as sent). Verification recomputes it and compares in constant time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

VERSION = "v1"


def sign(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """The ``X-MLflow-Signature`` value MLflow sends for this delivery."""
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    return f"{VERSION},{base64.b64encode(digest).decode()}"


def verify(secret: str, delivery_id: str, timestamp: str, body: bytes, header: str) -> bool:
    """Whether ``header`` is a valid signature of this delivery under ``secret`` (constant time).

    A header may carry several space-separated signatures (secret rotation); any valid one passes.
    """
    expected = sign(secret, delivery_id, timestamp, body).encode()
    valid = False
    for candidate in header.split():
        # No early exit: every candidate is compared, in constant time.
        valid |= hmac.compare_digest(candidate.encode(), expected)
    return valid
