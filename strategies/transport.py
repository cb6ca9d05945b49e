"""Weights on the wire: one flat byte array per message instead of one Flower object per tensor.

Flower 1.42 turns every ``Array`` of an ``ArrayRecord`` into objects of its own, and each hop
(ServerApp -> SuperLink -> SuperNode -> ClientApp process, and back) moves them with one HTTP
request each, at most two at a time. A yolo11n state dict has 499 tensors, so every broadcast and
every reply cost about a thousand requests per hop: measured on the process topology on 2 loaded
cores, a ClientApp process waited about 60 s for its broadcast before training 5 s. Packing the
record into one ``uint8`` array (Flower splits it into 5 MB chunks) leaves a handful of objects.

The bytes are the tensors' own (fp32 stays fp32, int64 buffers stay int64); the layout (key,
dtype, shape, in order) travels beside them in the ConfigRecord :data:`LAYOUT`. The ServerApp
packs what it sends and unpacks what it receives; the ClientApp does the same in
:func:`packed_arrays_mod`, so handlers, strategies and the reply guard only ever see the
ordinary per-tensor ``ArrayRecord``.
"""

from __future__ import annotations

import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from strategies.protocol import ARRAYS

LAYOUT = "arrays-layout"
PACKED = "packed"


class TransportError(ValueError):
    """A packed record whose bytes do not match its layout."""


def pack_arrays(record: ArrayRecord) -> tuple[ArrayRecord, ConfigRecord]:
    """``record`` as one ``uint8`` array plus its layout (``[[key, dtype, shape], ...]`` as JSON)."""
    arrays = [(key, record[key].numpy()) for key in record]
    layout = [[key, a.dtype.str, list(a.shape)] for key, a in arrays]
    # (ascontiguousarray would turn a 0-d buffer such as num_batches_tracked into shape (1,))
    flat = [np.ascontiguousarray(a.reshape(-1)).view(np.uint8) for _, a in arrays]
    blob = np.concatenate(flat) if flat else np.zeros(0, np.uint8)
    return ArrayRecord({PACKED: Array(blob)}), ConfigRecord({"layout": json.dumps(layout)})


def unpack_arrays(packed: ArrayRecord, layout: ConfigRecord) -> ArrayRecord:
    """The inverse of :func:`pack_arrays`.

    Raises
    ------
    TransportError
        The bytes are fewer or more than the layout describes, or the layout is not one.
    """
    try:
        blob = packed[PACKED].numpy()
        entries = json.loads(layout["layout"])
    except (KeyError, ValueError) as exc:
        raise TransportError(f"not a packed array record: {exc}") from None
    out, offset = {}, 0
    for key, dtype, shape in entries:
        dt = np.dtype(dtype)
        size = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if offset + size > blob.size:
            raise TransportError(f"packed arrays end at byte {blob.size}, but {key!r} needs bytes {offset}..{offset + size}")
        out[key] = Array(blob[offset:offset + size].view(dt).reshape(shape).copy())
        offset += size
    if offset != blob.size:
        raise TransportError(f"packed arrays hold {blob.size} bytes, the layout describes {offset}")
    return ArrayRecord(out)


def pack_content(content: RecordDict) -> RecordDict:
    """A copy of ``content`` with its ``arrays`` record packed (unchanged if it has none)."""
    if ARRAYS not in content.array_records:
        return content
    packed, layout = pack_arrays(content.array_records[ARRAYS])
    out = RecordDict({key: value for key, value in content.items() if key != ARRAYS})
    out[ARRAYS] = packed
    out[LAYOUT] = layout
    return out


def unpack_content(content: RecordDict) -> RecordDict:
    """A copy of ``content`` with its ``arrays`` record unpacked (unchanged if it was not packed)."""
    if LAYOUT not in content.config_records:
        return content
    out = RecordDict({key: value for key, value in content.items() if key not in (ARRAYS, LAYOUT)})
    out[ARRAYS] = unpack_arrays(content.array_records[ARRAYS], content.config_records[LAYOUT])
    return out


def packed(message: Message) -> Message:
    """``message`` with its content packed (in place; returned for chaining)."""
    if message.has_content():
        message.content = pack_content(message.content)
    return message


def unpacked(message: Message) -> Message:
    """``message`` with its content unpacked (in place; returned for chaining)."""
    if message.has_content():
        message.content = unpack_content(message.content)
    return message


def packed_arrays_mod(message: Message, context: Context, call_next) -> Message:
    """ClientApp mod: unpack the incoming broadcast, pack the outgoing reply."""
    return packed(call_next(unpacked(message), context))
