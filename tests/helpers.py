"""Plain helpers shared by test modules (fixtures live in conftest.py)."""


def without_timings(value):
    """Metrics with wall-clock fields removed (everything else must be reproducible)."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if "seconds" not in k and k != "elapsed"}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value
