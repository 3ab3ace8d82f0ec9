"""The I/O a reconcile pass needs, in one object: the API server and the tunes' Ray clusters."""

from __future__ import annotations

import os
from typing import Any

from instructune_operator.clients.kube import Kube
from instructune_operator.clients.ray_jobs import RayJobs
from instructune_operator.naming import ray_address
from instructune_operator.ray_auth import derive_token
from instructune_operator.settings import Settings


class Clients:
    """The I/O a pass needs; one per operator process (Ray clients cached per address and token).

    `ray_auth_key` (INSTRUCTUNE_RAY_AUTH_KEY, from a Secret the chart creates) turns on Ray's token
    authentication for every tune's cluster: each gets its own token (ray_auth.derive_token). A Ray
    head outside the cluster (ray_address_override) is called with RAY_AUTH_TOKEN instead."""

    def __init__(self, kube: Kube, settings: Settings, ray_auth_key: str | None = None) -> None:
        self.kube, self.settings = kube, settings
        self.ray_auth_key = (
            ray_auth_key if ray_auth_key is not None else os.environ.get("INSTRUCTUNE_RAY_AUTH_KEY")
        )
        # In a pod (the chart sets it from the downward API): the namespace the Ray clusters'
        # NetworkPolicies admit the operator from.
        self.operator_namespace = os.environ.get("INSTRUCTUNE_OPERATOR_NAMESPACE", "")
        self._ray: dict[tuple[str, str | None], RayJobs] = {}

    @property
    def cluster_auth(self) -> bool:
        """Whether tunes' Ray clusters run with token authentication."""
        return bool(self.ray_auth_key) and not self.settings.ray_address_override

    def ray_token(self, uid: str) -> str | None:
        if self.settings.ray_address_override:
            return os.environ.get("RAY_AUTH_TOKEN")
        return derive_token(self.ray_auth_key, uid) if self.ray_auth_key else None

    def ray(self, meta: dict[str, Any]) -> RayJobs:
        """The Jobs API of the tune's Ray cluster (its head's Service), with the cluster's token."""
        key = (ray_address(self.settings, meta["namespace"], meta["name"]), self.ray_token(meta["uid"]))
        if key not in self._ray:
            self._ray[key] = RayJobs(key[0], token=key[1])
        return self._ray[key]
