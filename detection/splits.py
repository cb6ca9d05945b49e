"""Split planning: who holds what, as pure index arithmetic on numpy arrays.

:func:`plan_federation` (domains known per image) and :func:`plan_weather_federation` (clear images
turned into disjoint weather domains) give a :class:`FederationPlan`; :func:`partition_clients`
deals the client pool by ``split`` (``non-iid``, ``iid``, ``dirichlet``). No file is read or
written, so 1,000+ clients cost nothing; every random choice comes from the ``rng`` passed in.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from detection.manifest import SPLITS, FederationError

# Roles of an image in a plan.
UNUSED, SERVER, CLIENT, TEST = 0, 1, 2, 3


@dataclass
class FederationPlan:
    """Who holds what, as index arrays over the input records.

    Attributes
    ----------
    domain_names : list of str
        Manifest domain order (server domain first).
    domain : np.ndarray
        ``(N,)`` domain code of each record (index into ``domain_names``).
    role : np.ndarray
        ``(N,)`` one of ``UNUSED``, ``SERVER``, ``CLIENT``, ``TEST``.
    client : np.ndarray
        ``(N,)`` partition id of client images, -1 elsewhere.
    unused : dict
        ``{domain: {"count": n, "reason": str}}``.
    """

    domain_names: list[str]
    domain: np.ndarray
    role: np.ndarray
    client: np.ndarray
    unused: dict = field(default_factory=dict)


def even_sizes(total: int, parts: int) -> np.ndarray:
    """Sizes of ``parts`` nearly equal groups summing to ``total`` (the first ones get the extra)."""
    base, extra = divmod(int(total), int(parts))
    return base + (np.arange(parts) < extra).astype(np.int64)


def largest_remainder_counts(proportions: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to ``total`` closest to ``proportions * total``."""
    exact = proportions * total
    counts = np.floor(exact).astype(np.int64)
    short = int(total - counts.sum())
    if short > 0:
        counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
    return counts


def _check_fractions(server_fraction: float, test_fraction: float, num_clients: int, split: str, alpha: float) -> None:
    if not 0 < server_fraction < 1:
        raise FederationError(f"server_fraction must be in (0, 1), got {server_fraction}")
    if not 0 <= test_fraction < 1:
        raise FederationError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if int(num_clients) < 1:
        raise FederationError(f"num_clients must be >= 1, got {num_clients}")
    if split not in SPLITS:
        raise FederationError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if split == "dirichlet" and not alpha > 0:
        raise FederationError(f"dirichlet_alpha must be > 0, got {alpha}")


def _server_count(n_train: int, server_fraction: float) -> int:
    n_server = int(round(server_fraction * n_train))
    if n_server < 1:
        raise FederationError(
            f"server_fraction {server_fraction} of {n_train} training images leaves the server no image"
        )
    return n_server


def plan_federation(
    domains: Sequence[str],
    *,
    server_domain: str,
    server_fraction: float = 0.25,
    num_clients: int = 3,
    split: str = "non-iid",
    dirichlet_alpha: float = 0.5,
    test_fraction: float = 0.15,
    rng: np.random.Generator,
) -> FederationPlan:
    """Plan a federation for records whose domains are known.

    The test split takes ``round(test_fraction * n)`` images of every domain. The server gets
    ``round(server_fraction * training images)`` images of ``server_domain``; the other training
    images form the client pool, partitioned by ``split`` (see :func:`partition_clients`).

    Parameters
    ----------
    domains : sequence of str
        Domain of each record.
    server_domain : str
    server_fraction, test_fraction : float
    num_clients : int
    split : {"non-iid", "iid", "dirichlet"}
    dirichlet_alpha : float
    rng : np.random.Generator

    Returns
    -------
    FederationPlan

    Raises
    ------
    FederationError
        If the server domain is absent or too small, or clients would get no image.
    """
    _check_fractions(server_fraction, test_fraction, num_clients, split, dirichlet_alpha)
    present = Counter(domains)
    if server_domain not in present:
        raise FederationError(f"server domain {server_domain!r} not among the domains {dict(sorted(present.items()))}")
    names = [server_domain] + sorted(d for d in present if d != server_domain)
    lookup = {name: code for code, name in enumerate(names)}
    domain = np.fromiter((lookup[d] for d in domains), np.int64, count=len(domains))
    role = np.full(len(domain), UNUSED, np.int64)

    for code in range(len(names)):
        members = rng.permutation(np.flatnonzero(domain == code))
        role[members[: int(round(test_fraction * len(members)))]] = TEST

    train = np.flatnonzero(role != TEST)
    n_server = _server_count(len(train), server_fraction)
    candidates = train[domain[train] == 0]
    if len(candidates) < n_server:
        counts = {names[c]: int(n) for c, n in zip(*np.unique(domain[train], return_counts=True))}
        raise FederationError(
            f"server domain {server_domain!r} has only {len(candidates)} training images, but server_fraction "
            f"{server_fraction} of {len(train)} training images needs {n_server}; lower the server fraction or pick "
            f"another server domain (training images per domain: {counts})"
        )
    role[rng.permutation(candidates)[:n_server]] = SERVER

    pool = np.flatnonzero(role == UNUSED)
    client, unused = partition_clients(pool, domain, names, num_clients, split, dirichlet_alpha, rng)
    role[client >= 0] = CLIENT
    return FederationPlan(names, domain, role, client, unused)


def plan_weather_federation(
    num_images: int,
    *,
    weathers: Sequence[str],
    server_domain: str = "clear",
    server_fraction: float = 0.25,
    num_clients: int = 3,
    split: str = "non-iid",
    dirichlet_alpha: float = 0.5,
    test_fraction: float = 0.15,
    rng: np.random.Generator,
) -> FederationPlan:
    """Plan a federation that turns clear images into disjoint weather domains.

    ``round(test_fraction * num_images)`` test images are divided evenly across all domains
    (the clear server domain included); of the training images ``round(server_fraction * n)``
    stay clear for the server and the rest are divided evenly across ``weathers``. Clients
    then partition the weather images by ``split``.

    Parameters
    ----------
    num_images : int
        Number of (clear) source images.
    weathers : sequence of str
        Target weather domains.
    server_domain : str
        Name of the unshifted domain.
    server_fraction, test_fraction, num_clients, split, dirichlet_alpha, rng
        As in :func:`plan_federation`.

    Returns
    -------
    FederationPlan
    """
    _check_fractions(server_fraction, test_fraction, num_clients, split, dirichlet_alpha)
    if not weathers:
        raise FederationError("the weather rule needs at least one weather")
    if server_domain in weathers:
        raise FederationError(f"server domain {server_domain!r} cannot also be a weather")
    names = [server_domain, *weathers]
    domain = np.zeros(num_images, np.int64)
    role = np.full(num_images, UNUSED, np.int64)
    order = rng.permutation(num_images)

    n_test = int(round(test_fraction * num_images))
    test = order[:n_test]
    role[test] = TEST
    domain[test] = np.repeat(np.arange(len(names)), even_sizes(n_test, len(names)))

    train = order[n_test:]
    n_server = _server_count(len(train), server_fraction)
    role[train[:n_server]] = SERVER
    shifted = train[n_server:]
    domain[shifted] = 1 + np.repeat(np.arange(len(weathers)), even_sizes(len(shifted), len(weathers)))

    client, unused = partition_clients(shifted, domain, names, num_clients, split, dirichlet_alpha, rng)
    role[client >= 0] = CLIENT
    return FederationPlan(names, domain, role, client, unused)


def partition_clients(
    pool: np.ndarray,
    domain: np.ndarray,
    names: Sequence[str],
    num_clients: int,
    split: str,
    alpha: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, dict]:
    """Deal the client pool to clients.

    ``non-iid``: one domain per client; clients take the non-server domains round-robin (the
    server domain, code 0, joins only if clients outnumber the other domains), and a domain's
    images are split evenly across its clients. ``iid``: the pool is shuffled and dealt evenly.
    ``dirichlet``: per domain, proportions over clients ~ Dir(alpha); a client left empty takes
    one image from the currently largest client.

    Parameters
    ----------
    pool : np.ndarray
        Indices of the client-pool records.
    domain : np.ndarray
        Domain code of every record (code 0 is the server domain).
    names : sequence of str
        Domain names by code.
    num_clients : int
    split : {"non-iid", "iid", "dirichlet"}
    alpha : float
        Dirichlet concentration.
    rng : np.random.Generator

    Returns
    -------
    client : np.ndarray
        ``(N,)`` partition id per record, -1 where none.
    unused : dict
        Pool images no client got, per domain with the reason.

    Raises
    ------
    FederationError
        If some client would get no image.
    """
    client = np.full(len(domain), -1, np.int64)
    unused: dict = {}
    if split == "non-iid":
        _deal_non_iid(pool, domain, names, num_clients, rng, client, unused)
    else:
        if len(pool) < num_clients:
            raise FederationError(f"{num_clients} clients but only {len(pool)} client images; use fewer clients")
        if split == "iid":
            client[rng.permutation(pool)] = np.repeat(np.arange(num_clients), even_sizes(len(pool), num_clients))
        else:
            _deal_dirichlet(pool, domain, num_clients, alpha, rng, client)
    return client, unused


def _deal_non_iid(pool, domain, names, num_clients, rng, client, unused) -> None:
    counts = np.bincount(domain[pool], minlength=len(names))
    others = [c for c in range(1, len(names)) if counts[c] > 0]
    leftover_server = int(counts[0])
    client_domains = list(others)
    if leftover_server and num_clients > len(others):
        client_domains.append(0)
    elif leftover_server:
        unused[names[0]] = {
            "count": leftover_server,
            "reason": "server-domain training images not on the server (clients do not outnumber the other domains)",
        }
    if not client_domains:
        raise FederationError("no images are left for clients (every training image is on the server)")
    for j, code in enumerate(client_domains):
        owners = np.arange(j, num_clients, len(client_domains))
        members = rng.permutation(pool[domain[pool] == code])
        if len(owners) == 0:
            unused[names[code]] = {
                "count": len(members),
                "reason": f"no client for this domain ({num_clients} clients, {len(client_domains)} client domains)",
            }
            continue
        if len(members) < len(owners):
            raise FederationError(
                f"domain {names[code]!r} has {len(members)} client images for {len(owners)} clients; use fewer clients"
            )
        client[members] = np.repeat(owners, even_sizes(len(members), len(owners)))


def _deal_dirichlet(pool, domain, num_clients, alpha, rng, client) -> None:
    for code in np.unique(domain[pool]):
        members = rng.permutation(pool[domain[pool] == code])
        proportions = rng.dirichlet(np.full(num_clients, float(alpha)))
        counts = largest_remainder_counts(proportions, len(members))
        client[members] = np.repeat(np.arange(num_clients), counts)
    totals = np.bincount(client[pool], minlength=num_clients)
    for empty in np.flatnonzero(totals == 0):
        donor = int(np.argmax(totals))
        moved = np.flatnonzero(client == donor)[-1]
        client[moved] = empty
        totals[donor] -= 1
        totals[empty] += 1
