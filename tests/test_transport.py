"""Weights on the wire: packing a state dict into one array and back is exact, and refuses junk."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from detection.model import build_model, get_state
from strategies import protocol
from strategies.transport import (LAYOUT, PACKED, HeldArray, TransportError, held_record, pack_arrays, pack_content,
                                  packed_arrays_mod, unpack_arrays, unpack_content)


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


def test_a_held_array_is_the_plain_array_it_stands_for_without_the_serialisation_round_trip():
    values = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    held, plain = HeldArray(values), Array(values)
    assert "_data" not in held.__dict__  # nothing serialised yet
    assert held == plain and plain == held
    assert (held.dtype, tuple(held.shape), held.stype) == (plain.dtype, tuple(plain.shape), plain.stype)
    out = held.numpy()
    out[:] = 0  # a fresh, writable array each time, as Flower's numpy() gives
    assert np.array_equal(held.numpy(), values)
    # Should it travel after all, it is the plain Array on the wire: same bytes, same object id.
    assert held.data == plain.data and held.deflate() == plain.deflate() and held.object_id == plain.object_id
    held.data = Array(np.ones(2, np.float32)).data  # bytes set later (inflation) win
    assert np.array_equal(held.numpy(), np.ones(2, np.float32))


def test_decoded_replies_hold_their_arrays_and_aggregation_views_do_not_reserialise_them():
    from strategies.base import aggregation_view

    record = held_record({"w": torch.arange(6.0).reshape(2, 3), "n": torch.tensor(7)})
    back = unpack_arrays(*pack_arrays(record))
    assert all(isinstance(back[k], HeldArray) and "_data" not in back[k].__dict__ for k in back)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    request = Message(RecordDict({protocol.CONFIG: ConfigRecord({"x": 1})}), dst_node_id=3, message_type="train")
    reply = Message(RecordDict({protocol.ARRAYS: back, protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: 2})}),
                    reply_to=request)
    view = aggregation_view(reply)
    arrays = view.content.array_records[protocol.ARRAYS]
    assert all(arrays[k] is back[k] for k in back) and all("_data" not in back[k].__dict__ for k in back)
    assert torch.equal(arrays.to_torch_state_dict()["n"], torch.tensor(7))


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


def test_fp16_halves_the_float_bytes_and_keeps_integer_buffers_exact():
    state = get_state(build_model("yolo11n.yaml", 5))
    record = ArrayRecord(state)
    full, _ = pack_arrays(record)
    half, layout = pack_arrays(record, "fp16")
    ints = sum(t.numel() * t.element_size() for t in state.values() if not t.is_floating_point())
    assert half.count_bytes() - ints / 2 == pytest.approx(full.count_bytes() / 2, rel=1e-3)
    back = unpack_arrays(half, layout).to_torch_state_dict()
    for key, tensor in state.items():
        assert back[key].dtype == tensor.dtype and back[key].shape == tensor.shape, key
        if tensor.is_floating_point():
            assert torch.allclose(back[key], tensor, rtol=1e-3, atol=1e-4), key
        else:
            assert torch.equal(back[key], tensor), key


def test_fp16_delta_sends_the_update_so_the_weights_keep_their_precision():
    torch.manual_seed(0)
    broadcast = {"w": torch.randn(1000) * 10, "n": torch.tensor(7)}
    trained = {"w": broadcast["w"] + torch.randn(1000) * 1e-3, "n": torch.tensor(8)}
    # The client's base is the broadcast as it arrived (fp16), the server decodes with the same.
    down, down_layout = pack_arrays(ArrayRecord(broadcast), "fp16-delta")
    base = {k: a.numpy() for k, a in unpack_arrays(down, down_layout).items()}
    client_start = torch.from_numpy(base["w"])
    client_trained = client_start + (trained["w"] - broadcast["w"])
    up, up_layout = pack_arrays(ArrayRecord({"w": client_trained, "n": trained["n"]}), "fp16-delta", base)
    assert [e[3] for e in json.loads(up_layout["layout"])] == ["fp16-delta", "raw"]
    back = unpack_arrays(up, up_layout, base).to_torch_state_dict()
    delta_error = (back["w"] - client_trained).abs().max().item()
    plain_error = (torch.from_numpy(unpack_arrays(*pack_arrays(ArrayRecord({"w": client_trained}), "fp16"))["w"].numpy())
                   - client_trained).abs().max().item()
    assert delta_error < 1e-6 < plain_error  # fp16 of the weights loses ~1e-2 at magnitude 10; of the update, nothing
    assert back["n"].item() == 8
    with pytest.raises(TransportError, match="no broadcast is known"):
        unpack_arrays(up, up_layout)


def test_the_client_mod_replies_in_the_runs_transport_against_the_broadcast_it_received():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    broadcast = {"w": torch.full((4,), 3.0)}

    def handler(message, context):
        w = message.content[protocol.ARRAYS]["w"].numpy()
        return Message(RecordDict({protocol.ARRAYS: ArrayRecord({"w": torch.from_numpy(w + 0.5)})}), reply_to=message)

    content = pack_content(RecordDict({protocol.ARRAYS: ArrayRecord(broadcast),
                                       protocol.CONFIG: ConfigRecord({"transport": "fp16-delta"})}), "fp16-delta")
    down_base = {k: a.numpy() for k, a in unpack_content(content)[protocol.ARRAYS].items()}
    reply = packed_arrays_mod(Message(content, dst_node_id=1, message_type="train"), None, handler)
    assert reply.content[protocol.ARRAYS][PACKED].numpy().nbytes == 4 * 2  # float16 on the wire
    back = unpack_content(reply.content, down_base)[protocol.ARRAYS]["w"].numpy()
    assert np.array_equal(back, np.full(4, 3.5, np.float32))
