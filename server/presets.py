"""The run config of one ``fedsto run`` method: preset + method + overrides, as one TOML file.

``flwr run`` does not accept a TOML file *and* ``key=value`` overrides together, so the merge
happens here and the result is written as the run's own TOML (``<out>/<method>.run-config.toml``).
Every key is checked against ``[tool.flwr.app.config]`` and every value against the knob's type
before anything starts; errors are :class:`~server.config.ConfigError` naming the key.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from server.config import METHODS, ConfigError, RunConfig

# Methods a preset runs when --method is not given (a preset can only hold run-config keys).
DEFAULT_METHODS = {"demo": ("partial", "fedsto")}

# Kebab-case key -> annotation text ("int", "float", "str", "bool") of every knob.
KNOB_TYPES = {f.name.replace("_", "-"): str(f.type) for f in fields(RunConfig)}


def preset_path(name: str, app: Path) -> Path:
    """``presets/<name>.toml`` of the app, or a path to a TOML file."""
    path = Path(name)
    if path.suffix == ".toml" and path.exists():
        return path.resolve()
    candidate = app / "presets" / f"{name}.toml"
    if not candidate.exists():
        known = sorted(p.stem for p in (app / "presets").glob("*.toml"))
        raise ConfigError(f"no preset {name!r} (looked for {candidate}); presets: {', '.join(known)}")
    return candidate


def read_preset(path: Path) -> dict[str, Any]:
    """A preset's key/value pairs (a TOML file of run-config keys)."""
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"preset {path}: not valid TOML ({err})") from None


def parse_methods(values: Sequence[str] | None, preset: str, preset_config: Mapping[str, Any]) -> list[str]:
    """``--method a --method b,c`` -> ``[a, b, c]`` (validated); default from the preset."""
    if not values:
        return list(DEFAULT_METHODS.get(preset, (preset_config.get("method", "fedsto"),)))
    methods = [m.strip() for v in values for m in v.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ConfigError(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    return list(dict.fromkeys(methods))


def parse_override(word: str) -> tuple[str, Any]:
    """One ``key=value`` word of ``fedsto run ... -- key=value`` as (key, value).

    The value is TOML (``seed=1``, ``lr=0.02``, ``progress=false``, ``model="yolov8n.yaml"``). A
    string knob also takes a bare value (``federation=/data/fed/federation.json``): the knob's
    type is known, so the text is the string, unless it is a quoted TOML string.

    Raises
    ------
    ConfigError
        Naming the word or key and what was expected.
    """
    key, sep, text = word.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"run-config override {word!r}: expected key=value")
    if key not in KNOB_TYPES:
        raise ConfigError(f"unknown run-config key {key!r} in {word!r}; known keys: {', '.join(sorted(KNOB_TYPES))}")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = None
    if KNOB_TYPES[key] == "str":
        return key, value if isinstance(value, str) else text
    if value is None:
        raise ConfigError(f"run-config {key}={text!r}: not a TOML {KNOB_TYPES[key]} "
                          f"(numbers as 0.5 or 10, booleans as true/false, text quoted as {key}='\"text\"')")
    return key, value


def parse_overrides(words: Sequence[str]) -> dict[str, Any]:
    """``key=value`` words (one pair each; a lone ``--`` is ignored); later words win."""
    return dict(parse_override(w) for w in words if w != "--")


def toml_value(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # also for nan / inf, which TOML spells the same way
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic strings
    raise ConfigError(f"run-config {key}={value!r}: values must be scalars (bool, int, float, str)")


def write_run_config(path: Path, values: Mapping[str, Any], note: str) -> Path:
    lines = [f"# {note}"] + [f"{k} = {toml_value(k, v)}" for k, v in values.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def check_keys(values: Mapping[str, Any], app: Path) -> None:
    """Fail early, naming the key, where ``flwr run`` would reject an unknown run-config key."""
    with (app / "pyproject.toml").open("rb") as handle:
        known = set(tomllib.load(handle)["tool"]["flwr"]["app"]["config"])
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown run-config key(s) {unknown}; see [tool.flwr.app.config] in {app / 'pyproject.toml'}")


def merged_config(preset_config: Mapping[str, Any], method: str, out: Path, clients: int | None,
                  extra: Mapping[str, Any]) -> dict[str, Any]:
    """Preset, then method / output dir / client count, then the user's overrides (last wins)."""
    values = dict(preset_config)
    values["method"] = method
    values["output-dir"] = str(out / method)
    if clients is not None:
        base = values.get("synthetic-clients", RunConfig.synthetic_clients)
        values["synthetic-clients"] = clients
        if clients != base and values.get("synthetic-images", RunConfig.synthetic_images) != 0:
            # A synthetic federation's client count is baked into its manifest: one folder per count.
            values["federation"] = f"{values.get('federation', RunConfig.federation)}-{clients}clients"
    values.update(extra)
    return values
