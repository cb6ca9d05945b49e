"""Aggregation strategies as plug-ins, and a registry to get one by name.

A strategy is found, in this order, as

1. a built-in name (:data:`BUILTIN`: ``fedavg``, ``fedbn``, ``fedprox``, ``fedadam``, ...);
2. an installed plug-in: an entry point in the group ``fedsto.strategies`` whose name is the
   strategy's name and whose value is ``package.module:Class`` (``pip install`` a package that
   declares it; see ``examples/``);
3. a dotted path ``package.module:Class`` (or ``package.module.Class``).

``get_strategy(name, options)`` builds it from the two run-config strings ``strategy`` and
``strategy-options``. See :mod:`strategies.base` for what a strategy decides.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from strategies.base import FederatedStrategy, StrategyError, StrategyOption, merge_states, sort_replies_by_partition

ENTRY_POINT_GROUP = "fedsto.strategies"

# Built-in strategies by name -> "module:Class" (imported lazily).
BUILTIN = {
    "fedavg": "strategies.fedavg:FedAvgStrategy",
    "fedbn": "strategies.fedbn:FedBNStrategy",
    "fedprox": "strategies.fedprox:FedProxStrategy",
    "fedavgm": "strategies.fedavgm:FedAvgMStrategy",
    "fedadam": "strategies.fedopt:FedAdamStrategy",
    "fedyogi": "strategies.fedopt:FedYogiStrategy",
    "fedadagrad": "strategies.fedopt:FedAdagradStrategy",
    "fedmedian": "strategies.robust:FedMedianStrategy",
    "fedtrimmedavg": "strategies.robust:FedTrimmedAvgStrategy",
    "krum": "strategies.robust:KrumStrategy",
    "multikrum": "strategies.robust:MultiKrumStrategy",
    "bulyan": "strategies.robust:BulyanStrategy",
    "fraug": "strategies.fraug:FRAugStrategy",
}


def plugins() -> dict[str, str]:
    """Installed plug-ins: entry-point name -> ``module:Class`` (group ``fedsto.strategies``)."""
    return {ep.name.lower(): ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _import(spec: str):
    module_name, sep, attr = spec.partition(":")
    if not sep:
        module_name, _, attr = spec.rpartition(".")
    if not all(part.isidentifier() for part in (*module_name.split("."), attr)):
        raise StrategyError(f"strategy {spec!r}: expected a built-in name ({', '.join(BUILTIN)}), an installed plug-in "
                            "or 'package.module:Class'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise StrategyError(f"strategy {spec!r}: cannot import module {module_name!r} ({exc})") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise StrategyError(f"strategy {spec!r}: module {module_name!r} has no attribute {attr!r}") from None


def strategy_class(name: str) -> type[FederatedStrategy]:
    """The :class:`FederatedStrategy` subclass a name stands for (imported, not instantiated).

    Parameters
    ----------
    name : str
        A built-in name, an installed plug-in's name, or ``package.module:Class`` / ``package.module.Class``.

    Raises
    ------
    StrategyError
        If the name is unknown, cannot be imported or is not a FederatedStrategy subclass.
    """
    key = str(name).lower()
    spec = BUILTIN.get(key) or plugins().get(key) or str(name)
    if spec == name and "." not in spec and ":" not in spec:
        found = plugins()
        raise StrategyError(f"unknown strategy {name!r}; built in: {', '.join(BUILTIN)}"
                            + (f"; plug-ins: {', '.join(found)}" if found else "; no plug-ins installed")
                            + "; or give 'package.module:Class'")
    cls = _import(spec)
    if not (isinstance(cls, type) and issubclass(cls, FederatedStrategy)):
        raise StrategyError(f"strategy {name!r} resolves to {cls!r}, which is not a strategies.base.FederatedStrategy subclass")
    return cls


def get_strategy(name: str, options: str = "") -> FederatedStrategy:
    """A strategy instance from the ``strategy`` and ``strategy-options`` run-config strings.

    Parameters
    ----------
    name : str
        See :func:`strategy_class`.
    options : str
        ``name=value`` pairs (see :func:`strategies.base.parse_options`).

    Returns
    -------
    FederatedStrategy
    """
    return strategy_class(name).from_options(options)


def available() -> list[tuple[str, str, type[FederatedStrategy] | None, str]]:
    """Every strategy found: ``(name, source, class or None, error)``; source is ``built-in`` or the plug-in's spec."""
    rows = []
    for name, source in [*((n, "built-in") for n in BUILTIN), *plugins().items()]:
        try:
            rows.append((name, source, strategy_class(name), ""))
        except StrategyError as err:
            rows.append((name, source, None, str(err)))
    return rows


__all__ = ["BUILTIN", "ENTRY_POINT_GROUP", "FederatedStrategy", "StrategyError", "StrategyOption", "available", "get_strategy",
           "merge_states", "plugins", "sort_replies_by_partition", "strategy_class"]
