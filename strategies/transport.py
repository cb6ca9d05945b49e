"""Weights on the wire: one flat byte array per message instead of one Flower object per tensor.

Flower 1.42 turns every ``Array`` of an ``ArrayRecord`` into objects of its own, and each hop
(ServerApp -> SuperLink -> SuperNode -> ClientApp process, and back) moves them with one HTTP
request each, at most two at a time. A yolo11n state dict has 499 tensors, so every broadcast and
every reply cost about a thousand requests per hop: measured on the process topology on 2 loaded
cores, a ClientApp process waited about 60 s for its broadcast before training 5 s. Packing the
record into one ``uint8`` array (Flower splits it into 5 MB chunks) leaves a handful of objects.

By default (``transport = "fp32"``) the bytes are the tensors' own (fp32 stays fp32, int64
buffers stay int64). Compressed transport (:data:`ENCODINGS`) sends float32 tensors as float16:
``fp16`` halves both directions; ``fp16-delta`` sends the broadcast as float16 and each reply as
the float16 *difference* from the broadcast the client received, which keeps the weights' own
precision up to the rounding of a small update. Integer buffers always travel as they are. The
layout (key, dtype, shape, wire form, in order) travels beside the bytes in the ConfigRecord
:data:`LAYOUT`. The ServerApp packs what it sends and unpacks what it receives; the ClientApp
does the same in :func:`packed_arrays_mod`, so handlers, strategies and the reply guard only ever
see the ordinary per-tensor float32 ``ArrayRecord``: a delta is added back to the broadcast
before the guard looks at it, and every strategy aggregates full weights, whatever the
transport. A float16 overflow (a value beyond 65504) arrives as inf and the guard rejects it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.constant import SType

from strategies.protocol import ARRAYS, CONFIG

LAYOUT = "arrays-layout"
PACKED = "packed"
ENCODINGS = ("fp32", "fp16", "fp16-delta")  # run-config ``transport``
RAW, HALF, HALF_DELTA = "raw", "fp16", "fp16-delta"  # wire form of one tensor


class TransportError(ValueError):
    """A packed record whose bytes do not match its layout."""


class HeldArray(Array):
    """An ``Array`` that holds its ndarray: ``numpy()`` copies it, and the ``np.save`` bytes are made only if asked for.

    Flower's ``Array`` serialises its ndarray with ``np.save`` when built and parses it with
    ``np.load`` on every ``numpy()``. For the arrays of this module's records that is pure cost:
    a record about to be packed, and the decoded arrays of a reply that only the guard and the
    strategy read, never travel as they are. At 499 tensors per yolo11n reply the round trip cost
    the server about 100 ms per reply (``benchmarks/sim_overhead.py``). ``numpy()`` still returns
    a fresh, writable array, as Flower's does; ``data`` (what Flower sends, hashes and counts) is
    the same ``np.save`` bytes, made on first use.
    """

    def __init__(self, ndarray: np.ndarray) -> None:
        self.__dict__.update(dtype=str(ndarray.dtype), shape=tuple(ndarray.shape), stype=SType.NUMPY,
                             _held=np.asarray(ndarray))

    @property
    def data(self) -> bytes:
        if "_data" not in self.__dict__:
            self.__dict__["_data"] = Array(self.__dict__["_held"]).data
        return self.__dict__["_data"]

    @data.setter
    def data(self, value: bytes) -> None:  # Flower's inflation writes the bytes: they win from now on
        self.__dict__["_data"] = value
        self.__dict__.pop("_held", None)

    def deflate(self) -> bytes:  # should one travel after all, it travels as the plain Array it equals
        return Array(dtype=self.dtype, shape=tuple(self.shape), stype=self.stype, data=self.data).deflate()

    def numpy(self) -> np.ndarray:
        held = self.__dict__.get("_held")
        return super().numpy() if held is None else held.copy()

    def __eq__(self, other: object) -> bool:  # equal to a plain Array of the same array
        if not isinstance(other, Array):
            return NotImplemented
        return (self.dtype, tuple(self.shape), self.stype, self.data) == (other.dtype, tuple(other.shape), other.stype, other.data)

    __hash__ = None


def held_record(tensors: Mapping[str, object]) -> ArrayRecord:
    """An ``ArrayRecord`` of :class:`HeldArray` from torch tensors or ndarrays (no serialisation)."""
    record = ArrayRecord()  # (item by item: ArrayRecord(dict) would copy each into a serialised plain Array)
    for k, v in tensors.items():
        record[k] = HeldArray(v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
    return record


def pack_arrays(record: ArrayRecord, encoding: str = "fp32", base: Mapping[str, np.ndarray] | None = None
                ) -> tuple[ArrayRecord, ConfigRecord]:
    """``record`` as one ``uint8`` array plus its layout (``[[key, dtype, shape, wire], ...]`` as JSON).

    Parameters
    ----------
    record : ArrayRecord
    encoding : str
        One of :data:`ENCODINGS`.
    base : mapping of str to ndarray, optional
        For ``fp16-delta``: what the receiver already holds (the decoded broadcast); a float32
        tensor with a base of its shape travels as the float16 difference from it.
    """
    if encoding not in ENCODINGS:
        raise TransportError(f"transport {encoding!r}: expected one of {', '.join(ENCODINGS)}")
    layout, flat = [], []
    for key in record:
        a = original = record[key].numpy()
        wire = RAW
        if encoding != "fp32" and a.dtype == np.float32:
            reference = base.get(key) if (encoding == HALF_DELTA and base is not None) else None
            if reference is not None and reference.shape == a.shape:
                a, wire = (a - reference).astype(np.float16), HALF_DELTA
            else:
                a, wire = a.astype(np.float16), HALF
        layout.append([key, original.dtype.str, list(a.shape), wire])
        # (ascontiguousarray would turn a 0-d buffer such as num_batches_tracked into shape (1,))
        flat.append(np.ascontiguousarray(a.reshape(-1)).view(np.uint8))
    blob = np.concatenate(flat) if flat else np.zeros(0, np.uint8)
    return ArrayRecord({PACKED: Array(blob)}), ConfigRecord({"layout": json.dumps(layout)})


def unpack_arrays(packed: ArrayRecord, layout: ConfigRecord, base: Mapping[str, np.ndarray] | None = None) -> ArrayRecord:
    """The inverse of :func:`pack_arrays` (``base``: the same one the sender used, for deltas).

    Raises
    ------
    TransportError
        The bytes are fewer or more than the layout describes, the layout is not one, or a delta
        arrives without its base.
    """
    try:
        blob = packed[PACKED].numpy()
        entries = json.loads(layout["layout"])
    except (KeyError, ValueError) as exc:
        raise TransportError(f"not a packed array record: {exc}") from None
    out, offset = {}, 0
    for entry in entries:
        key, dtype, shape = entry[:3]
        wire = entry[3] if len(entry) > 3 else RAW
        dt = np.dtype(dtype)
        on_wire = dt if wire == RAW else np.dtype(np.float16)
        size = int(np.prod(shape, dtype=np.int64)) * on_wire.itemsize
        if offset + size > blob.size:
            raise TransportError(f"packed arrays end at byte {blob.size}, but {key!r} needs bytes {offset}..{offset + size}")
        value = blob[offset:offset + size].view(on_wire).reshape(shape).astype(dt)  # astype copies
        if wire == HALF_DELTA:
            if base is None or key not in base:
                raise TransportError(f"{key!r} arrived as a difference from the broadcast, but no broadcast is known here")
            value = base[key] + value
        out[key] = value
        offset += size
    if offset != blob.size:
        raise TransportError(f"packed arrays hold {blob.size} bytes, the layout describes {offset}")
    return held_record(out)


def as_base(record: ArrayRecord) -> dict[str, np.ndarray]:
    """A decoded record as the ``base`` of delta encoding."""
    return {key: record[key].numpy() for key in record}


def pack_content(content: RecordDict, encoding: str = "fp32", base: Mapping[str, np.ndarray] | None = None) -> RecordDict:
    """A copy of ``content`` with its ``arrays`` record packed (unchanged if it has none)."""
    if ARRAYS not in content.array_records:
        return content
    packed, layout = pack_arrays(content.array_records[ARRAYS], encoding, base)
    out = RecordDict({key: value for key, value in content.items() if key != ARRAYS})
    out[ARRAYS] = packed
    out[LAYOUT] = layout
    return out


def unpack_content(content: RecordDict, base: Mapping[str, np.ndarray] | None = None) -> RecordDict:
    """A copy of ``content`` with its ``arrays`` record unpacked (unchanged if it was not packed)."""
    if LAYOUT not in content.config_records:
        return content
    out = RecordDict({key: value for key, value in content.items() if key not in (ARRAYS, LAYOUT)})
    out[ARRAYS] = unpack_arrays(content.array_records[ARRAYS], content.config_records[LAYOUT], base)
    return out


def wire_bytes(message: Message) -> int:
    """Bytes of a message's (packed) arrays as they travel."""
    return sum(record.count_bytes() for record in message.content.array_records.values()) if message.has_content() else 0


def packed(message: Message, encoding: str = "fp32", base: Mapping[str, np.ndarray] | None = None) -> Message:
    """``message`` with its content packed (in place; returned for chaining)."""
    if message.has_content():
        message.content = pack_content(message.content, encoding, base)
    return message


def unpacked(message: Message, base: Mapping[str, np.ndarray] | None = None) -> Message:
    """``message`` with its content unpacked (in place; returned for chaining)."""
    if message.has_content():
        message.content = unpack_content(message.content, base)
    return message


def packed_arrays_mod(message: Message, context: Context, call_next) -> Message:
    """ClientApp mod: unpack the incoming broadcast, pack the outgoing reply in the run's ``transport``."""
    incoming = unpacked(message)
    base, encoding = None, "fp32"
    if incoming.has_content():
        config = incoming.content.config_records.get(CONFIG)
        encoding = str(config.get("transport", "fp32")) if config is not None else "fp32"
        if encoding == HALF_DELTA and ARRAYS in incoming.content.array_records:
            base = as_base(incoming.content.array_records[ARRAYS])
    return packed(call_next(incoming, context), encoding, base)
