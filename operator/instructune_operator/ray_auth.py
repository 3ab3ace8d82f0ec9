"""Pure: the Ray token of a tune's cluster (Ray's token authentication, RAY_AUTH_MODE=token).

One token per RayCluster, derived from a key only the operator holds and the tune's UID: the
operator writes it into the cluster's Secret and computes it again whenever it calls the cluster's
Jobs API, so it never reads a Secret back (it is granted create and patch on Secrets, never get,
list or watch). A tune re-created under the same name has a new UID, hence a new token.
"""

from __future__ import annotations

import hashlib
import hmac

# Ray refuses tokens shorter than 32 characters; a SHA-256 hex digest has 64.
TOKEN_CONTEXT = b"instructune/ray-auth/v1/"


def derive_token(key: str, uid: str) -> str:
    if not key:
        raise ValueError("the Ray auth key is empty")
    return hmac.new(key.encode(), TOKEN_CONTEXT + uid.encode(), hashlib.sha256).hexdigest()
