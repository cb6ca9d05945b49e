"""Weights on the wire: packing a state dict into one array and back is exact, and refuses junk."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from detection.model import build_model, get_state
from strategies import protocol
from strategies.transport import (LAYOUT, PACKED, TransportError, pack_arrays, pack_content, packed_arrays_mod,
                                  unpack_arrays, unpack_content)


def test_a_detector_state_dict_survives_packing_bit_for_bit_as_one_array():
    state = get_state(build_model("yolo11n.yaml", 5))
    state["strategy/extra"] = torch.arange(6, dtype=torch.float64).reshape(2, 3)  # other dtypes travel too
    record = ArrayRecord(state)
    packed, layout = pack_arrays(record)
    assert list(packed) == [PACKED] and len(record) > 400
    back = unpack_arrays(packed, layout).to_torch_state_dict()
    assert list(back) == list(state)  # order kept
    for key, tensor in state.items():
        assert back[key].dtype == tensor.dtype and back[key].shape == tensor.shape and torch.equal(back[key], tensor), key
    assert packed.count_bytes() < record.count_bytes() + 1024  # the same bytes, not more


def test_content_without_arrays_is_left_alone_and_the_rest_of_the_content_travels():
    plain = RecordDict({protocol.CONFIG: ConfigRecord({"a": 1})})
    assert pack_content(plain) is plain and unpack_content(plain) is plain
    content = RecordDict({protocol.ARRAYS: ArrayRecord({"w": torch.ones(3)}), protocol.METRICS: MetricRecord({"m": 2.0})})
    wire = pack_content(content)
    assert set(wire) == {protocol.ARRAYS, protocol.METRICS, LAYOUT}
    back = unpack_content(wire)
    assert set(back) == {protocol.ARRAYS, protocol.METRICS}
    assert torch.equal(back[protocol.ARRAYS].to_torch_state_dict()["w"], torch.ones(3))


@pytest.mark.parametrize("cut", [-4, 4])
def test_bytes_that_do_not_match_the_layout_are_refused(cut):
    packed, layout = pack_arrays(ArrayRecord({"w": torch.ones(8)}))
    blob = packed[PACKED].numpy()
    wrong = blob[:cut] if cut < 0 else np.concatenate([blob, np.zeros(cut, np.uint8)])
    with pytest.raises(TransportError, match="bytes"):
        unpack_arrays(ArrayRecord({PACKED: Array(wrong)}), layout)


def test_the_client_mod_hands_the_handler_plain_arrays_and_packs_its_reply():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # a reply needs what a SuperNode sets
    seen = {}

    def handler(message, context):
        seen["keys"] = list(message.content[protocol.ARRAYS])
        return Message(RecordDict({protocol.ARRAYS: ArrayRecord({"up": torch.zeros(2)})}), reply_to=message)

    incoming = Message(pack_content(RecordDict({protocol.ARRAYS: ArrayRecord({"a": torch.ones(2), "b": torch.ones(1)})})),
                       dst_node_id=1, message_type="train")
    reply = packed_arrays_mod(incoming, None, handler)
    assert seen["keys"] == ["a", "b"]
    assert list(reply.content[protocol.ARRAYS]) == [PACKED] and LAYOUT in reply.content.config_records
