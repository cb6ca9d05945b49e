"""Plain helpers shared by test modules (fixtures live in conftest.py)."""


def without_timings(value):
    """Metrics without what differs between two runs of one config: wall-clock fields, and the Ray
    node a client ran on (a fresh Ray instance has new node ids). Everything else must be reproducible."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if "seconds" not in k and k not in ("elapsed", "ray_node")}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def sample_manifest() -> dict:
    """A small valid federation manifest (2 classes, 3 domains, 2 clients; one client holds two domains).

    Files are not on disk: validate it in memory (``detection.manifest.validate_manifest``) or load
    it with ``Federation.load(path, check_files=False)``.
    """
    def image(name, labels, domain=None):
        entry = {"file": f"images/{name}.png"}
        if domain is None:
            entry["labels"] = labels
        else:
            entry["domain"], entry["hidden_labels"] = domain, labels
        return entry

    return {
        "format": "fedsto-federation/1",
        "created_by": {"program": "tests.helpers.sample_manifest", "server_fraction": 0.25, "weathers": None},
        "seed": 0,
        "class_names": ["car", "person"],
        "server_domain": "clear",
        "domains": ["clear", "rainy", "night"],
        "split": "iid",
        "paths": "relative",
        "server": {"domain": "clear", "images": [
            image("s0", [[0, 0.5, 0.5, 0.2, 0.2], [1, 0.25, 0.75, 0.1, 0.3]]),
            image("s1", []),
            image("s2", [[1, 0.5, 0.5, 1.0, 1.0]]),
        ]},
        "clients": [
            {"partition_id": 0, "domains": {"rainy": 2}, "images": [
                image("c0", [[0, 0.4, 0.4, 0.2, 0.2]], "rainy"),
                image("c1", [], "rainy"),
            ]},
            {"partition_id": 1, "domains": {"night": 1, "rainy": 1}, "images": [
                image("c2", [[1, 0.6, 0.6, 0.2, 0.4]], "night"),
                image("c3", [[0, 0.3, 0.3, 0.2, 0.2], [0, 0.7, 0.7, 0.2, 0.2]], "rainy"),
            ]},
        ],
        "test": {
            "clear": [image("t0", [[0, 0.5, 0.5, 0.5, 0.5]])],
            "rainy": [image("t1", [[1, 0.5, 0.5, 0.2, 0.2], [0, 0.1, 0.1, 0.2, 0.2], [1, 0.9, 0.9, 0.2, 0.2]])],
            "night": [],
        },
        "unused": {"clear": {"count": 4, "reason": "server-domain training images not on the server"}},
        "report": {"missing image": {"count": 1, "examples": ["images/gone.png"]}},
    }
