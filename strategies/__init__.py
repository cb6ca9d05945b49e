"""Aggregation strategies as plug-ins, and a registry to get one by name.

``get_strategy("fedavg")`` returns the built-in FedAvg; ``get_strategy("my_pkg.module:MyStrategy")``
(or ``my_pkg.module.MyStrategy``) imports a user's :class:`~strategies.base.FederatedStrategy`
subclass. See :mod:`strategies.base` for what a strategy decides.
"""

from __future__ import annotations

import importlib

from strategies.base import FederatedStrategy, merge_states, sort_replies_by_partition

# Built-in strategies by name -> "module:Class" (imported lazily).
BUILTIN = {
    "fedavg": "strategies.fedavg:FedAvgStrategy",
}


class StrategyError(ValueError):
    """An unknown or unusable strategy name."""


def _import(spec: str):
    module_name, sep, attr = spec.partition(":")
    if not sep:
        module_name, _, attr = spec.rpartition(".")
    if not all(part.isidentifier() for part in (*module_name.split("."), attr)):
        raise StrategyError(f"strategy {spec!r}: expected a built-in name ({', '.join(BUILTIN)}) or 'package.module:Class'")
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
        ``fedavg`` or ``package.module:Class`` / ``package.module.Class``.

    Raises
    ------
    StrategyError
        If the name is unknown, cannot be imported or is not a FederatedStrategy subclass.
    """
    spec = BUILTIN.get(str(name).lower(), str(name))
    if spec == name and "." not in spec and ":" not in spec:
        raise StrategyError(f"unknown strategy {name!r}; built in: {', '.join(BUILTIN)}; or give 'package.module:Class'")
    cls = _import(spec)
    if not (isinstance(cls, type) and issubclass(cls, FederatedStrategy)):
        raise StrategyError(f"strategy {name!r} resolves to {cls!r}, which is not a strategies.base.FederatedStrategy subclass")
    return cls


def get_strategy(name: str, **options) -> FederatedStrategy:
    """A strategy instance by built-in name or dotted path (see :func:`strategy_class`).

    Parameters
    ----------
    name : str
        ``fedavg`` or ``package.module:Class`` / ``package.module.Class``.
    **options
        Keyword arguments for the class.

    Returns
    -------
    FederatedStrategy
    """
    return strategy_class(name)(**options)


__all__ = ["BUILTIN", "FederatedStrategy", "StrategyError", "get_strategy", "strategy_class", "merge_states", "sort_replies_by_partition"]
