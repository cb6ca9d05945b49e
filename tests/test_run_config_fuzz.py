"""Property test: any run-config override or preset mutation loads, or fails with ConfigError naming the key.

What ``fedsto run`` does with its configuration before anything starts: read the preset, parse
the ``-- key=value`` words, merge, check the keys against pyproject and parse/validate the
result. Whatever the words and values, that either works or raises the project's
:class:`~server.config.ConfigError` whose message names the key that was mutated; never another
exception, never a traceback.
"""

from __future__ import annotations

import math
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.config import ConfigError, RunConfig
from server.launch import project_root
from server.presets import KNOB_TYPES, check_keys, merged_config, parse_overrides, read_preset

APP = project_root()
SMOKE = read_preset(APP / "presets" / "smoke.toml")
OUT = Path("/nonexistent/fedsto-fuzz")
# A strategy name is imported: keep the fuzz to names whose import is harmless.
STRATEGY_NAMES = ["fedavg", "FedAvg", "fedprox", "strategies.fedavg:FedAvgStrategy", "strategies.fedavg.FedAvgStrategy",
                  "strategies.base:FederatedStrategy", "nope.mod:X", "a..b:c", "", ":", "os:path", "detection:seeds"]
SETTINGS = settings(max_examples=1000, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

toml_text = st.one_of(
    st.integers(-10**12, 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(lambda f: "nan" if math.isnan(f) else repr(f).replace("inf", "inf")),
    st.sampled_from(["true", "false", "True", "1e400", "-0.0", "0x10", "1_000", "[1, 2]", "{a = 1}", "'", '"', "''",
                     '"quoted"', "'single'", "1979-05-27", "nan", "inf", "-inf", "", " ", "=", "a=b", "0.5 0.6"]),
    st.text(max_size=20),
)


def load(preset: dict, words: list[str]) -> RunConfig:
    """The configuration path of ``fedsto run`` up to (not including) starting any process."""
    values = merged_config(preset, "fedsto", OUT, None, parse_overrides(words))
    check_keys(values, APP)
    return RunConfig.from_run_config(values)


def assert_loads_or_names(preset: dict, words: list[str], key: str) -> None:
    try:
        load(preset, words)
    except ConfigError as err:
        assert key in str(err) or repr(key) in str(err), f"{words}: {err}"  # repr: keys with control characters


@SETTINGS
@given(key=st.sampled_from(sorted(KNOB_TYPES)), text=toml_text)
def test_an_override_word_loads_or_names_its_key(key, text):
    if key == "strategy":
        text = '"' + STRATEGY_NAMES[len(text) % len(STRATEGY_NAMES)] + '"'
    assert_loads_or_names(SMOKE, [f"{key}={text}"], key)


json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                        st.text(max_size=12), st.lists(st.integers(), max_size=2))


@SETTINGS
@given(data=st.data())
def test_a_mutated_preset_loads_or_names_the_key(data):
    preset = dict(SMOKE)
    action = data.draw(st.sampled_from(["change", "delete", "extra"]))
    if action == "delete":
        key = data.draw(st.sampled_from(sorted(preset)))
        del preset[key]
        load(preset, [])  # a missing key takes its default
        return
    if action == "extra":
        key = data.draw(st.text(min_size=1, max_size=15).filter(lambda k: k not in KNOB_TYPES))
    else:
        key = data.draw(st.sampled_from(sorted(KNOB_TYPES)))
    value = data.draw(json_scalar)
    if key == "strategy":
        value = data.draw(st.sampled_from(STRATEGY_NAMES))
    preset[key] = value
    assert_loads_or_names(preset, [], key)
