"""What travels between ServerApp and ClientApp: message types and the per-round instructions.

The ServerApp imports this module to build messages; the ClientApp to read them. Everything a
client needs for a round is in :class:`RoundInstructions` (a ``ConfigRecord``), so a client needs
no copy of the server's run config and stays stateless between rounds.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields

# Message types (Flower routes "<category>.<action>" to the handler registered for it).
TRAIN = "train"
QUERY_PARTITION = "query.partition"
EVALUATE_TEACHER = "evaluate.teacher"

# Record keys inside a message's RecordDict.
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
INFO = "info"

NUM_EXAMPLES = "num-examples"
PARTITION_ID = "partition-id"


@dataclass(frozen=True)
class RoundInstructions:
    """A client's instructions for one round (sent as the message's ``config`` ConfigRecord).

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
        Orthogonality coefficient on neck and head (0: off).
    ortho_form : str
        ``srip`` or ``symmetric``.
    evaluate_personal : bool
        Evaluate the locally trained model on the client's own domain after training.
    federation : str
        The manifest the server uses; a node's ``--node-config federation=...`` overrides it.
    model : str
        Ultralytics model yaml (the architecture the arrays belong to).
    seed, local_epochs, imgsz, batch_size, lr, momentum, weight_decay
        Training settings.
    ema_decay : str
        ``auto`` or a number.
    tau_low, tau_high, nms_conf, nms_iou, pseudo_mode, min_reliable_boxes
        Pseudo-label settings.
    strategy : str
        Aggregation strategy name (its client half decides what stays local).
    threads : int
        Torch CPU threads (0: the CPUs Ray gives the actor).
    """

    server_round: int
    phase: str
    trainable: tuple[str, ...]
    upload: tuple[str, ...]
    ortho_lambda: float
    ortho_form: str
    evaluate_personal: bool
    federation: str
    model: str
    seed: int
    local_epochs: int
    imgsz: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    ema_decay: str
    tau_low: float
    tau_high: float
    nms_conf: float
    nms_iou: float
    pseudo_mode: str
    min_reliable_boxes: int
    strategy: str = "fedavg"
    threads: int = 0

    def to_config(self) -> dict:
        """Plain values for a ``ConfigRecord`` (tuples become lists of str)."""
        out = asdict(self)
        out["trainable"] = list(self.trainable)
        out["upload"] = list(self.upload)
        return out

    @classmethod
    def from_config(cls, config) -> "RoundInstructions":
        """Read a ``ConfigRecord`` (or dict); a missing key is an error naming it."""
        names = [f.name for f in fields(cls)]
        optional = {f.name for f in fields(cls) if f.default is not MISSING}
        missing = [n for n in names if n not in config and n not in optional]
        if missing:
            raise KeyError(f"round instructions lack {missing}")
        values = {n: config[n] for n in names if n in config}
        values["trainable"] = tuple(values["trainable"])
        values["upload"] = tuple(values["upload"])
        return cls(**values)
