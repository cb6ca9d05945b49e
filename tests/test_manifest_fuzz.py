"""Property: a randomly damaged manifest either loads or is one FederationError naming where it was damaged.

One node of a small valid manifest is mutated (replaced by a random JSON value, by NaN/inf or an
out-of-range number, or by another value found in the manifest, so that cross-references break;
deleted, given an extra key or element, or emptied). Validation, which is
what :meth:`Federation.load` runs on the parsed file, must then succeed or raise
:class:`FederationError` (never anything else) whose JSON path is

* the mutated node itself;
* a descendant of it: the node was replaced by a container whose content is wrong
  (``server`` replaced by ``{}`` is reported as ``server.domain: required key is missing``);
* its parent: a label row is checked as a unit (``test.clear[0].labels[2]`` for a bad ``x``), a
  container's invariant (a repeated name) is reported on the container or its element; or
* another node, but only when the message then names the mutated node or its parent as the
  thing referred to: cross-references (``server_domain: 'clear' is not one of domains [...]``
  after ``domains[0]`` changed, ``class id 1 outside 0..0 (class_names has 1 names)`` after a
  class name was deleted, ``... but clients[0].images holds 1 'rainy' images`` after an image was
  deleted, ``... listed twice (also at server.images[0].file)``).
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections import Counter

from helpers import sample_manifest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detection.manifest import FederationError, validate_manifest

EXAMPLES = 2000
MANIFEST = "mem/federation.json"
SAMPLE = sample_manifest()
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def path_text(path: tuple) -> str:
    """The JSON path as messages write it (written independently of the module under test)."""
    text = ""
    for key in path:
        if isinstance(key, int):
            text += f"[{key}]"
        elif _KEY.fullmatch(key):
            text += f".{key}" if text else key
        else:
            text += f"[{json.dumps(key)}]"
    return text


def nodes(value, path=()):
    yield path, value
    if isinstance(value, dict):
        for key, child in value.items():
            yield from nodes(child, (*path, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from nodes(child, (*path, index))


NODES = [path for path, _ in nodes(SAMPLE)]
CONTAINERS = [path for path, value in nodes(SAMPLE) if isinstance(value, (dict, list))]

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**20), max_value=10**20)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6)
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
special_numbers = st.sampled_from(
    [math.nan, math.inf, -math.inf, -1, -0.5, 0, 0.0, 1, 1.0, 1.5, 2, 7, 10**30, -(10**30), 1e300, -1e-9, True, False]
)
# Every distinct leaf of the sample ("clear", "images/c1.png", 0.2, ...): same-type replacements.
LEAVES = sorted({json.dumps(value) for _, value in nodes(SAMPLE) if not isinstance(value, (dict, list))})
keys = st.text(max_size=6) | st.sampled_from(["file", "labels", "domain", "images", "count", "rainy", "clear", "x"])


KINDS = ("replace", "special", "swap", "delete", "add", "empty")


@st.composite
def mutations(draw):
    """``(kind, path, apply)``: what was done, the JSON path it was done at, and a function doing it."""
    kind = draw(st.sampled_from(KINDS))
    if kind in ("replace", "special", "swap"):
        path = draw(st.sampled_from(NODES))
        value = draw({"replace": json_values, "special": special_numbers, "swap": st.sampled_from(LEAVES).map(json.loads)}[kind])
    elif kind == "delete":
        path = draw(st.sampled_from(NODES[1:]))
        value = None
    elif kind == "add":
        container = draw(st.sampled_from(CONTAINERS))
        holder = get(SAMPLE, container)
        key = len(holder) if isinstance(holder, list) else draw(keys.filter(lambda k: k not in holder))
        path, value = (*container, key), draw(json_values)
    else:
        path = draw(st.sampled_from(CONTAINERS))
        value = draw(st.sampled_from([[], {}]))

    def apply(manifest):
        if not path:
            return value
        parent = get(manifest, path[:-1])
        if kind == "delete":
            del parent[path[-1]]
        elif kind == "add" and isinstance(parent, list):
            parent.append(value)
        else:
            parent[path[-1]] = value
        return manifest

    return kind, path, apply


def get(value, path):
    for key in path:
        value = value[key]
    return value


def mentions(text: str, name: str) -> bool:
    """``name`` appears in ``text`` as a whole JSON path, not as the tail of a longer one."""
    return re.search(r"(?<![\w.\]\"])" + re.escape(name) + r"(?![\w\[.])", text) is not None


def accepted(message: str, path: tuple) -> bool:
    prefix = f"{MANIFEST}: "
    if not path:
        return True  # the whole document was replaced: any complaint is about it
    mutated, parent = path_text(path), path_text(path[:-1])
    if message.startswith(f"{prefix}{mutated}: "):
        return True
    if message.startswith(f"{prefix}{mutated}.") or message.startswith(f"{prefix}{mutated}["):
        return True  # a descendant of the replaced node
    if parent and message.startswith(f"{prefix}{parent}: "):
        return True
    text = message[len(prefix):].split(": ", 1)[-1]
    # A changed item of a list can surface as a count that no longer matches that list
    # ("clients[1].domains.night: 1 images, but clients[1].images holds 0"): naming the list is enough.
    holder = path_text(path[:-2]) if len(path) > 2 and isinstance(path[-2], int) else ""
    return mentions(text, mutated) or (bool(parent) and mentions(text, parent)) or (bool(holder) and mentions(text, holder))


OUTCOMES: Counter = Counter()


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(mutations())
def check_mutation(mutation):
    kind, path, apply = mutation
    manifest = apply(copy.deepcopy(SAMPLE))
    try:
        validate_manifest(manifest, MANIFEST)
    except FederationError as err:
        message = str(err)
        assert message.startswith(f"{MANIFEST}: ") and len(message.splitlines()) == 1, message
        assert accepted(message, path), f"{kind} at {path_text(path) or '<root>'}: {message}"
        OUTCOMES[kind, "rejected"] += 1
    else:
        OUTCOMES[kind, "loaded"] += 1


def test_mutated_manifests_load_or_name_the_mutated_path():
    OUTCOMES.clear()
    check_mutation()
    assert sum(OUTCOMES.values()) >= EXAMPLES
    for kind in KINDS:  # every kind ran, and was mostly caught
        assert OUTCOMES[kind, "rejected"] > OUTCOMES[kind, "loaded"] / 4, dict(OUTCOMES)


def test_the_path_check_is_not_vacuous():
    message = f"{MANIFEST}: clients[0].domains.rainy: 3 images, but clients[0].images holds 2 'rainy' images"
    assert accepted(message, ("clients", 0, "domains", "rainy"))
    assert accepted(message, ("clients", 0, "images", 1))  # parent named in the text
    assert not accepted(message, ("domains", 1))  # "domains" only as the tail of clients[0].domains
    assert not accepted(message, ("clients", 1, "images"))
    assert not accepted(f"{MANIFEST}: server.images: expected a list", ("server", "domain"))
