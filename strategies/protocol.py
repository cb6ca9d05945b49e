"""The contract between ServerApp and ClientApp: message types, record keys, round instructions.

Both halves import this module (``server`` to build messages, ``client`` to read them); neither
imports the other. Everything a client needs for a round is in :class:`RoundInstructions` (sent
as the message's ``config`` ConfigRecord), so a client holds no copy of the server's run config
and stays stateless between rounds.

:class:`ClientKnobs` is the one table of run-config knobs that travel to clients. The server's
``RunConfig`` extends it (so each knob has one name, type, default and doc) and
:meth:`RoundInstructions.for_round` copies it whole. Adding a client knob is one field here, with
its line in the ``Parameters`` block (and its default in ``pyproject.toml``, which flwr requires
and ``tests/test_server_config.py`` checks against this table).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from detection.semi import SemiConfig
from detection.train import TrainConfig

# Message types (Flower routes "<category>.<action>" to the handler registered for it).
TRAIN = "train"
QUERY_PARTITION = "query.partition"
EVALUATE_TEACHER = "evaluate.teacher"

# Record keys inside a message's RecordDict.
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
INFO = "info"

# Metric and info keys every reply carries.
NUM_EXAMPLES = "num-examples"
PARTITION_ID = "partition-id"
DOMAIN = "domain"
FEDERATION_ID = "federation-id"
VERSION_PREFIX = "version-"  # info keys of the partition query's version handshake
RAY_NODE = "ray-node"  # info key of a simulated client's train reply: the Ray node it ran on


def site_versions(model_yaml: str) -> dict[str, str]:
    """What a site reports in the handshake: flwr and fedsto versions, the model yaml's hash.

    Keys carry :data:`VERSION_PREFIX` (``version-flwr``, ``version-fedsto``, ``version-model``).
    """
    from importlib import metadata

    import flwr

    from detection.model import model_yaml_hash

    try:
        fedsto = metadata.version("fedsto")
    except metadata.PackageNotFoundError:
        fedsto = "not installed"
    return {f"{VERSION_PREFIX}flwr": flwr.__version__, f"{VERSION_PREFIX}fedsto": fedsto,
            f"{VERSION_PREFIX}model": f"{model_yaml}@{model_yaml_hash(model_yaml)}"}


def version_differences(ours: dict[str, str], theirs: dict) -> list[str]:
    """How a site's handshake differs from the server's (empty: compatible).

    flwr must agree in major.minor (Flower's own rule for its components); fedsto and the model
    yaml hash exactly. A missing key is a difference (an older client).
    """
    out = []
    for key, mine in ours.items():
        name = key.removeprefix(VERSION_PREFIX)
        got = theirs.get(key)
        if got is None:
            out.append(f"{name}: not reported there, {mine} here")
            continue
        same = (str(got).split(".")[:2] == mine.split(".")[:2]) if name == "flwr" else str(got) == mine
        if not same:
            out.append(f"{name} {got} there, {mine} here")
    return out


@dataclass(frozen=True, kw_only=True)
class ClientKnobs:
    """Run-config knobs that travel to every client, every round (kebab-case in the run config).

    Parameters
    ----------
    strategy : str
        Aggregation strategy: a built-in name (``fedsto strategies`` lists them), an installed
        plug-in's name, or a dotted ``package.module:Class`` (its client half decides what stays
        local and what it adds to the loss).
    strategy_options : str
        The strategy's options as ``name=value`` pairs, e.g. ``"proximal-mu=0.01"`` (both halves
        build the strategy from the same string).
    model : str
        Ultralytics detection yaml (``yolo11n.yaml``, ``yolov5nu.yaml``, ...): the architecture
        the broadcast arrays belong to.
    seed : int
        Fixes model init, sampling, shuffles and augmentations; with the round and the partition
        id it seeds each client's RNG.
    imgsz, batch_size, lr, momentum, weight_decay
        Training settings shared by server and clients (paper: SGD, constant lr 0.01).
    augment_scale, augment_translate : float
        Zoom ``1 +- scale`` and shift ``+- translate`` in labelled training and the student's
        strong view (Ultralytics' defaults 0.5 and 0.1; the paper's YOLOv5 trains with them).
    local_epochs : int
        Client epochs per round (paper: 1).
    ema_decay : str
        Local EMA teacher decay: a number (paper: 0.999) or ``auto`` (from the local step count).
    ema_update : str
        ``step`` (the paper's: the local teacher follows every optimiser step) or ``round`` (it stays
        the broadcast model for the whole round).
    tau_low, tau_high : float
        Pseudo-label score thresholds (paper: 0.1, 0.6).
    nms_conf, nms_iou : float
        Teacher NMS settings (paper: 0.1, 0.65).
    pseudo_mode : str
        Uncertain boxes: ``soft`` targets, ``ignore`` in the class loss, or ``drop``.
    min_reliable_boxes : int
        Images with fewer reliable pseudo boxes are skipped (and counted).
    ortho_form : str
        ``srip`` (smaller Gram) or ``symmetric`` (the paper's literal form).
    client_threads : int
        Torch CPU threads on clients (0 = the CPUs Ray gives the actor).
    device : str
        ``auto`` (CUDA when the process sees a GPU), ``cpu``, ``cuda``, ``cuda:1``... for the server
        and every client; a node's ``--node-config device=...`` overrides it for that node. In Ray
        simulation a client sees only the GPUs Ray gave its actor (``--gpus-per-client``), so
        ``auto`` is the CPU for clients given none.
    amp : bool
        Mixed precision (autocast to float16 + gradient scaling) when training on CUDA; ignored on
        the CPU.
    oom_retry : bool
        After a CUDA out-of-memory error, a client retries the round once at half the batch size
        (a second failure is a failed reply naming the memory it had).
    client_image_cache_mb : int
        Letterboxed pixels a client process keeps in memory (least recently used are dropped and
        read again from disk when needed): memory stays flat however many partitions a Ray actor
        serves. A partition that fits is read from disk once.
    transport : str
        How weights travel (``strategies.transport``): ``fp32`` (as they are), ``fp16`` (float32
        tensors as float16 both ways: half the bytes) or ``fp16-delta`` (float16 broadcast, replies
        as the float16 difference from it). Decoded before the reply guard, so strategies always
        aggregate float32 weights.
    """

    strategy: str = "fedavg"
    strategy_options: str = ""
    model: str = "yolo11n.yaml"
    # The engine's defaults are the paper's (DESIGN.md, "FedSTO details"): one source for them.
    seed: int = TrainConfig.seed
    imgsz: int = TrainConfig.imgsz
    batch_size: int = TrainConfig.batch_size
    lr: float = TrainConfig.lr
    momentum: float = TrainConfig.momentum
    weight_decay: float = TrainConfig.weight_decay
    augment_scale: float = TrainConfig.scale
    augment_translate: float = TrainConfig.translate
    local_epochs: int = TrainConfig.epochs
    ema_decay: str = "0.999"  # the paper's; the engine's default is "auto" (right for short centralised runs)
    ema_update: str = SemiConfig.ema_update
    tau_low: float = SemiConfig.tau_low
    tau_high: float = SemiConfig.tau_high
    nms_conf: float = SemiConfig.nms_conf
    nms_iou: float = SemiConfig.nms_iou
    pseudo_mode: str = SemiConfig.pseudo_mode
    min_reliable_boxes: int = SemiConfig.min_reliable_boxes
    ortho_form: str = "srip"
    client_threads: int = 0
    client_image_cache_mb: int = 1024
    device: str = "auto"
    amp: bool = True
    oom_retry: bool = True
    transport: str = "fp32"


CLIENT_KNOBS = tuple(f.name for f in fields(ClientKnobs))


@dataclass(frozen=True, kw_only=True)
class RoundInstructions(ClientKnobs):
    """A client's instructions for one round: the :class:`ClientKnobs` plus what the round decides.

    Parameters
    ----------
    server_round : int
        Global round number; with ``seed`` and the partition id it seeds the client's RNG.
    phase : str
        ``phase1``, ``phase2`` or ``ssfl`` (logged; behaviour follows the fields below).
    trainable : tuple of str
        Parameter groups the client trains (the others frozen, their BatchNorm in eval mode).
    upload : tuple of str
        Groups whose tensors the client uploads.
    ortho_lambda : float
        Orthogonality coefficient on neck and head this round, per image (0: off, e.g. in phase 1).
    evaluate_personal : bool
        Evaluate the locally trained model on the client's own domain after training.
    federation : str
        The manifest the server uses; a node's ``--node-config federation=...`` overrides it.
    run_key : str
        The project's id of the run (stable across ``resume``, unlike Flower's run id): with the
        partition id it names the node's saved local state.
    """

    server_round: int
    phase: str
    trainable: tuple[str, ...]
    upload: tuple[str, ...]
    ortho_lambda: float
    evaluate_personal: bool
    federation: str
    run_key: str

    @classmethod
    def for_round(cls, knobs: ClientKnobs, **round_fields) -> "RoundInstructions":
        """Instructions from the run's client knobs (every one of them) and this round's fields."""
        return cls(**{name: getattr(knobs, name) for name in CLIENT_KNOBS}, **round_fields)

    def to_config(self) -> dict:
        """Plain values for a ``ConfigRecord`` (tuples become lists of str)."""
        out = asdict(self)
        out["trainable"] = list(self.trainable)
        out["upload"] = list(self.upload)
        return out

    @classmethod
    def from_config(cls, config) -> "RoundInstructions":
        """Read a ``ConfigRecord`` (or dict); missing keys are an error naming them."""
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in config]
        if missing:
            raise KeyError(f"round instructions lack {missing} (server and client run different fedsto versions?)")
        values = {n: config[n] for n in names}
        values["trainable"] = tuple(values["trainable"])
        values["upload"] = tuple(values["upload"])
        return cls(**values)
