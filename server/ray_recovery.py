"""Simulation workers that die (OOM kill, segfault) are replaced, and their message is sent again.

Flower 1.42's Ray backend (``flwr.simulation.ray_transport.ray_actor.BasicActorPool``) answers a
message whose actor died with an error reply, and then puts the *dead* actor back into its pool:
every later message given to it fails the same way, so a long run would go on with a share of
its replies failing in every round. :func:`install_actor_replacement` makes the pool put a new
actor (same resources) in the dead one's place; the ServerApp then sends the lost message once
more (:func:`worker_died` tells such a reply from a ClientApp's own exception). The patch is
applied in the simulation process, where the ServerApp and the backend live; it changes nothing
for deployed SuperNodes.
"""

from __future__ import annotations

import logging

log = logging.getLogger("fedsto.server")

# Error-reply reasons that mean the worker process is gone, not that the ClientApp failed.
WORKER_DEATH_MARKERS = ("ActorDiedError", "RayActorError", "ActorUnavailableError", "WorkerCrashedError")

_INSTALLED = False


def worker_died(reason: str) -> bool:
    """Whether an error reply's reason says the simulation worker died (a new one can redo the work)."""
    return any(marker in reason for marker in WORKER_DEATH_MARKERS)


def install_actor_replacement() -> bool:
    """Patch Flower's ``BasicActorPool`` once per process so a dead actor is replaced; False without Ray."""
    global _INSTALLED
    if _INSTALLED:
        return True
    try:
        import ray
        from flwr.simulation.ray_transport.ray_actor import BasicActorPool
    except ImportError:
        return False
    fetch, put_back = BasicActorPool.fetch_result_and_return_actor_to_pool, BasicActorPool.add_actor_back_to_pool

    def fetch_result_and_return_actor_to_pool(self, future):
        try:
            return fetch(self, future)
        except ray.exceptions.RayActorError:
            # The backend's error path calls add_actor_back_to_pool(future) next.
            self.__dict__.setdefault("_fedsto_dead", set()).add(future)
            raise

    def add_actor_back_to_pool(self, future) -> None:
        dead = self.__dict__.get("_fedsto_dead", set())
        if future not in dead:
            put_back(self, future)
            return
        dead.discard(future)
        actor = self._future_to_actor.pop(future)
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001  (already gone: nothing to kill)
            pass
        self.pool.append(self.create_actor_fn())
        log.warning("a Ray actor of the simulation died; a new one (same resources) took its place")

    BasicActorPool.fetch_result_and_return_actor_to_pool = fetch_result_and_return_actor_to_pool
    BasicActorPool.add_actor_back_to_pool = add_actor_back_to_pool
    _INSTALLED = True
    return True
