"""Tests for topology.frames: the msgpack codec, its refusals, and the replay guard."""

import math
import random

import msgpack
import pytest

from topology.frames import (
    FRAME_VERSION,
    Ack,
    Alive,
    Dead,
    FrameError,
    Heartbeat,
    Left,
    Payload,
    PingReq,
    ReplayGuard,
    Suspect,
    View,
    decode,
    encode,
    view_digest,
)

SAMPLES = [
    Heartbeat("tokyo-1", "tokyo", 1_700_000_000_000, 42, 12.5, view_digest({"tokyo-2": True})),
    PingReq("tokyo-1", "london-2", 7),
    Ack("tokyo-2", "london-2", 7, 3, True),
    Ack("tokyo-2", "london-2", 8, 3, False),
    Suspect("london-2", 3, "tokyo-1"),
    Alive("london-2", 4, "london-2"),
    Dead("london-2", 3, "tokyo-1"),
    Left("london-3", 9, "london-3"),
    View.of("tokyo-1", 1, 5, {"tokyo-2": True, "london-1": False}),
    Payload("lease.grant", {"epoch": 4, "holder": "tokyo", "until_s": 3.5, "raw": b"\x00\x01"}),
]


def _raw(**fields) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


def _hb_fields(**over) -> dict:
    doc = {"v": FRAME_VERSION, "t": "hb", "node_id": "a", "site": "s", "incarnation": 1,
           "seq": 1, "sent_s": 1.0, "view_digest": 0}
    doc.update(over)
    return doc


@pytest.mark.parametrize("frame", SAMPLES, ids=lambda f: type(f).__name__)
def test_decode_when_encoded_frame_then_round_trips_equal(frame):
    data = encode(frame)
    assert decode(data) == frame
    assert type(decode(data)) is type(frame)


def test_encode_when_heartbeat_then_small_enough_for_the_measured_budget():
    assert len(encode(SAMPLES[0])) < 120


def test_decode_when_claims_share_fields_then_kind_decides_the_type():
    kinds = {type(decode(encode(cls("n", 1, "m")))) for cls in (Suspect, Alive, Dead, Left)}
    assert kinds == {Suspect, Alive, Dead, Left}
    assert Suspect("n", 1, "m") != Dead("n", 1, "m")


@pytest.mark.parametrize("data,reason", [
    (b"\xc1", "not_msgpack"),                                   # reserved byte
    (b"\x92\x01", "not_msgpack"),                               # truncated array
    (msgpack.packb({"v": 1}) + b"\x00", "not_msgpack"),         # trailing bytes
    (msgpack.packb([1, "hb"]), "not_a_map"),
    (_raw(**_hb_fields(v=2)), "wrong_version"),
    (_raw(**_hb_fields(v=True)), "wrong_version"),
    (_raw(**{k: v for k, v in _hb_fields().items() if k != "v"}), "wrong_version"),
    (_raw(**_hb_fields(t="gossip")), "unknown_type"),
    (_raw(**{k: v for k, v in _hb_fields().items() if k != "seq"}), "missing_field"),
    (_raw(**_hb_fields(colour="red")), "extra_field"),
    (_raw(**_hb_fields(seq="1")), "bad_field"),
    (_raw(**_hb_fields(seq=-1)), "bad_field"),
    (_raw(**_hb_fields(seq=True)), "bad_field"),
    (_raw(**_hb_fields(node_id="")), "bad_field"),
    (_raw(**_hb_fields(node_id="x" * 256)), "bad_field"),
    (_raw(**_hb_fields(sent_s=float("nan"))), "not_finite"),
    (_raw(**_hb_fields(sent_s=float("inf"))), "not_finite"),
    (_raw(**_hb_fields(sent_s=None)), "bad_field"),
    (_raw(v=1, t="view", node_id="a", incarnation=1, seq=1, reachable={"b": True}, digest=5),
     "bad_digest"),
    (_raw(v=1, t="view", node_id="a", incarnation=1, seq=1, reachable={"b": 1},
          digest=view_digest({"b": True})), "bad_field"),
    (_raw(v=1, t="ack", by="a", target="b", nonce=1, incarnation=1, ok=1), "bad_field"),
    (_raw(v=1, t="payload", kind="lease", body=[1, 2]), "bad_field"),
])
def test_decode_when_frame_is_wrong_then_frame_error_with_reason(data, reason):
    with pytest.raises(FrameError) as info:
        decode(data)
    assert info.value.reason == reason
    assert str(info.value).startswith(reason)


def test_decode_when_larger_than_max_frame_bytes_then_oversize_before_parsing():
    with pytest.raises(FrameError) as info:
        decode(b"\x00" * 1025, max_frame_bytes=1024)
    assert info.value.reason == "oversize" and "1025 bytes" in str(info.value)


def test_decode_when_not_bytes_then_not_bytes():
    with pytest.raises(FrameError) as info:
        decode("hello")  # type: ignore[arg-type]
    assert info.value.reason == "not_bytes"


def test_encode_when_frame_exceeds_limit_then_oversize():
    big = Payload("replication.batch", {"records": [b"x" * 1000] * 100})
    with pytest.raises(FrameError) as info:
        encode(big, max_frame_bytes=4096)
    assert info.value.reason == "oversize"
    assert len(encode(big, max_frame_bytes=1 << 20)) > 100_000


def test_encode_when_body_not_packable_or_not_a_frame_then_not_encodable():
    with pytest.raises(FrameError) as info:
        encode(Payload("x", {"s": {1, 2}}))
    assert info.value.reason == "not_encodable"
    with pytest.raises(FrameError) as info:
        encode("hb")  # type: ignore[arg-type]
    assert info.value.reason == "not_encodable"


def test_construct_when_field_invalid_then_frame_error_names_field():
    with pytest.raises(FrameError, match=r"hb.sent_s = nan: must be finite"):
        Heartbeat("a", "s", 1, 1, math.nan, 0)
    with pytest.raises(FrameError, match=r"suspect.incarnation = -1"):
        Suspect("a", -1, "b")
    with pytest.raises(FrameError, match="bad_digest"):
        View("a", 1, 1, {"b": True}, 0)


def test_view_digest_when_key_order_differs_then_equal_and_changes_with_content():
    a = view_digest({"x": True, "y": False})
    assert a == view_digest({"y": False, "x": True})
    assert a != view_digest({"x": True, "y": True})
    assert 0 <= a < 2**63


def _mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        if op < 0.4 and buf:
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif op < 0.6 and buf:
            del buf[rng.randrange(len(buf)):]
        elif op < 0.8:
            buf.insert(rng.randrange(len(buf) + 1), rng.randrange(256))
        elif buf:
            i, j = sorted(rng.randrange(len(buf)) for _ in range(2))
            buf[i:j] = buf[i:j][::-1]
    return bytes(buf)


def test_decode_when_fuzzed_with_random_and_mutated_bytes_then_only_frame_error():
    rng = random.Random(20240604)
    valid = [encode(f) for f in SAMPLES]
    reasons = set()
    outcomes = {"ok": 0, "error": 0}
    for i in range(20000):
        if i % 4 == 0:
            data = bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))
        else:
            data = _mutate(rng.choice(valid), rng)
        try:
            frame = decode(data)
        except FrameError as exc:
            reasons.add(exc.reason)
            outcomes["error"] += 1
        else:
            outcomes["ok"] += 1
            assert decode(encode(frame)) == frame  # whatever decodes is a valid, stable frame
    assert outcomes["error"] > 10000 and outcomes["ok"] > 0
    assert {"not_msgpack", "bad_field", "unknown_type"} <= reasons


def test_accept_when_garbage_then_none_and_counted_by_reason():
    guard = ReplayGuard()
    assert guard.accept(b"\xc1") is None
    assert guard.accept(_raw(**_hb_fields(v=9))) is None
    assert guard.accept(b"\x00" * 70000) is None
    assert guard.dropped == {"not_msgpack": 1, "wrong_version": 1, "oversize": 1}
    assert guard.accepted == 0


def _hb(inc: int, seq: int, node: str = "a") -> Heartbeat:
    return Heartbeat(node, "s", inc, seq, float(seq), 0)


def test_accept_when_exact_replay_then_dropped_as_duplicate():
    guard = ReplayGuard()
    data = encode(_hb(1, 5))
    assert guard.accept(data) == _hb(1, 5)
    assert guard.accept(data) is None
    assert guard.dropped["duplicate"] == 1


def test_admit_when_older_incarnation_then_stale_and_newer_restarts_window():
    guard = ReplayGuard()
    assert guard.admit(_hb(5, 100))
    assert not guard.admit(_hb(4, 1000))
    assert guard.admit(_hb(6, 0))        # restarted: seq may start low again
    assert not guard.admit(_hb(5, 101))
    assert guard.dropped == {"stale_incarnation": 2}


def test_admit_when_reordered_within_window_then_accepted_once():
    guard = ReplayGuard(window=4)
    assert guard.admit(_hb(1, 10))
    assert guard.admit(_hb(1, 12))
    assert guard.admit(_hb(1, 11))       # late but unseen, within the window
    assert not guard.admit(_hb(1, 11))   # now seen
    assert not guard.admit(_hb(1, 8))    # 12 - 8 = 4: outside a window of 4
    assert guard.reordered == 1
    assert guard.dropped == {"duplicate": 1, "too_old": 1}


def test_admit_when_window_is_one_then_strictly_increasing_only():
    guard = ReplayGuard(window=1)
    assert guard.admit(_hb(1, 1)) and guard.admit(_hb(1, 3))
    assert not guard.admit(_hb(1, 2))
    assert not guard.admit(_hb(1, 3))
    assert guard.dropped == {"too_old": 1, "duplicate": 1}


def test_admit_when_senders_and_kinds_differ_then_tracked_independently():
    guard = ReplayGuard()
    assert guard.admit(_hb(1, 9, node="a"))
    assert guard.admit(_hb(1, 9, node="b"))
    assert guard.admit(View.of("a", 1, 9, {}))   # views count their own seqs
    assert guard.admit(Suspect("a", 1, "b")) and guard.admit(Suspect("a", 1, "b"))
    assert not guard.dropped


def test_forget_when_sender_reaped_then_its_old_frames_are_new_again():
    guard = ReplayGuard()
    assert guard.admit(_hb(2, 5))
    guard.forget("a")
    assert guard.admit(_hb(1, 1))


def test_check_when_random_stream_then_each_seq_accepted_at_most_once_property():
    rng = random.Random(5)
    for window in (1, 8, 32, 64):
        guard = ReplayGuard(window=window)
        seqs = list(range(300))
        # local shuffles (reordering by at most 3) plus replays of earlier seqs
        for i in range(0, 300, 4):
            block = seqs[i:i + 4]
            rng.shuffle(block)
            seqs[i:i + 4] = block
        stream = seqs + rng.choices(range(300), k=200)
        accepted = [s for s in stream if guard.check("a", "hb", 1, s)]
        assert len(accepted) == len(set(accepted))
        if window >= 8:
            assert sorted(accepted) == list(range(300))  # no live frame lost to reordering


def test_construct_guard_when_window_zero_then_value_error():
    with pytest.raises(ValueError, match="window = 0"):
        ReplayGuard(window=0)


def test_check_when_sender_table_full_then_new_senders_dropped_known_ones_kept():
    guard = ReplayGuard(max_senders=2)
    assert guard.admit(_hb(1, 1, node="a")) and guard.admit(_hb(1, 1, node="b"))
    assert not guard.admit(_hb(1, 1, node="c"))
    assert guard.admit(_hb(1, 2, node="a"))
    assert guard.dropped == {"too_many_senders": 1}
