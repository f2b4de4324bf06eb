"""Journal replication (topology.replication): batching, windows, acks, lag, resends, gaps,
dedup, epoch fencing, divergence, and a seeded lossy-network simulation."""

from __future__ import annotations

import heapq
import itertools
import random

import msgpack
import pytest
from pydantic import ValidationError

from topology.lease import LeaseMessageError, Outgoing
from topology.replication import (
    AckStatus,
    Lag,
    ReplicatedRecord,
    ReplicationAck,
    ReplicationBatch,
    ReplicationConfig,
    ReplicationReceiver,
    ReplicationSender,
    decode_replication_message,
)

CFG = ReplicationConfig(batch_max_records=4, linger_s=0.01, ack_timeout_s=0.5,
                        max_in_flight_records=8, backlog_records=32)
S = "ledger"


def sender(standbys=("b",), epoch: int = 1, **kw) -> ReplicationSender:
    return ReplicationSender("a", standbys, kw.pop("config", CFG), epoch, **kw)


class Standby:
    """A receiver with an in-memory journal."""

    def __init__(self, name: str = "b", **kw) -> None:
        self.journal: list[ReplicatedRecord] = []
        self.rx = ReplicationReceiver(name, self.journal.append, **kw)

    def seqs(self, stream: str = S) -> list[int]:
        return [r.seq for r in self.journal if r.stream == stream]


def batch(epoch: int, first_seq: int, records: tuple, history=None,
          source: str = "a") -> ReplicationBatch:
    """A batch whose sender wrote the whole stream under ``epoch`` unless ``history`` says."""
    return ReplicationBatch(source, S, epoch, first_seq, records,
                            tuple(history or ([epoch, 1],)))


def batches(out) -> list[ReplicationBatch]:
    return [o.message for o in out]


# --------------------------------------------------------------------------------------------
# Config and messages
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kw", "needle"), [
    ({"batch_max_records": 10, "max_in_flight_records": 5}, "batch_max_records=10"),
    ({"backlog_records": 5, "max_in_flight_records": 8, "batch_max_records": 4},
     "backlog_records=5"),
    ({"ack_timeout_s": 0}, "ack_timeout_s"), ({"linger_s": -1.0}, "linger_s"),
    ({"window": 3}, "window"),
])
def test_config_when_invalid_then_error_names_field_and_value(kw, needle):
    with pytest.raises(ValidationError, match=needle):
        ReplicationConfig(**kw)


@pytest.mark.parametrize("msg", [
    ReplicationBatch("a", S, 3, 10, ({"t": "intent", "amount": 1.5}, [1, 2], "x"),
                     ([1, 1], [3, 8])),
    ReplicationAck("b", S, 3, 14, "gap"),
], ids=lambda m: type(m).__name__)
def test_message_when_roundtripped_through_msgpack_then_equal(msg):
    assert decode_replication_message(msgpack.unpackb(msgpack.packb(msg.to_body()))) == msg


def test_decode_when_records_not_a_list_then_error_names_field():
    body = {**batch(1, 1, ()).to_body(), "records": "abc"}
    with pytest.raises(LeaseMessageError) as err:
        decode_replication_message(body)
    assert err.value.field == "records"


# --------------------------------------------------------------------------------------------
# Sender
# --------------------------------------------------------------------------------------------


def test_append_when_several_streams_then_sequences_independent_from_one_or_journal_tail():
    tx = sender(next_seqs={"risk": 41}, histories={"risk": [(1, 1)]})
    assert [tx.append(S, i, 0.0) for i in range(3)] == [1, 2, 3]
    assert tx.append("risk", "x", 0.0) == 41


def test_tick_when_partial_batch_then_waits_linger_and_full_batch_goes_at_once():
    tx = sender()
    tx.append(S, "r1", 0.0)
    assert tx.tick(0.005) == []
    [b] = batches(tx.tick(0.01))
    assert (b.first_seq, b.records, b.epoch, b.source) == (1, ("r1",), 1, "a")
    for i in range(4):
        tx.append(S, f"r{i + 2}", 0.02)
    [b] = batches(tx.tick(0.02))
    assert (b.first_seq, len(b.records)) == (2, 4)


def test_tick_when_window_full_then_no_more_until_acked():
    tx = sender()
    for i in range(20):
        tx.append(S, i, 0.0)
    out = batches(tx.tick(0.0))
    assert [b.first_seq for b in out] == [1, 5] and tx.tick(0.1) == []
    tx.handle(ReplicationAck("b", S, 1, 5, "ok"), 0.1)
    assert [b.first_seq for b in batches(tx.tick(0.1))] == [9]


def test_lag_when_acks_arrive_then_records_and_seconds_shrink_to_zero():
    tx = sender()
    for i in range(6):
        tx.append(S, i, float(i))
    tx.tick(10.0)
    assert tx.lag("b", 10.0) == Lag(6, 10.0)
    tx.handle(ReplicationAck("b", S, 1, 4, "ok"), 10.0)
    assert tx.lag("b", 10.0, stream=S) == Lag(3, 7.0)  # oldest unacked is seq 4, appended at 3
    tx.handle(ReplicationAck("b", S, 1, 7, "ok"), 10.0)
    assert tx.lag("b", 11.0) == Lag(0, 0.0) and tx.lag("nobody", 11.0) == Lag(0, 0.0)


def test_tick_when_no_ack_within_timeout_then_resends_from_last_acked():
    tx = sender()
    for i in range(6):
        tx.append(S, i, 0.0)
    assert [b.first_seq for b in batches(tx.tick(0.0))] == [1]
    assert [b.first_seq for b in batches(tx.tick(0.01))] == [5]  # partial, after linger_s
    tx.handle(ReplicationAck("b", S, 1, 3, "ok"), 0.1)
    assert tx.tick(0.59) == []
    assert [b.first_seq for b in batches(tx.tick(0.6))] == [3]  # 3..6 in one batch
    assert tx.counters["ack_timeouts"] == 1


def test_ack_when_gap_then_resends_once_from_the_missing_record():
    tx = sender()
    for i in range(8):
        tx.append(S, i, 0.0)
    tx.tick(0.0)  # 1-4, 5-8; say 1-4 was lost
    tx.handle(ReplicationAck("b", S, 1, 1, "gap"), 0.1)
    assert [b.first_seq for b in batches(tx.tick(0.1))] == [1, 5]
    tx.handle(ReplicationAck("b", S, 1, 1, "gap"), 0.1)  # from a batch already in flight
    assert tx.tick(0.1) == [] and tx.counters["rewinds"] == 1


def test_ack_when_standby_beyond_backlog_then_needs_resync_until_it_catches_up():
    tx = sender()
    for i in range(40):  # backlog keeps 32: seqs 9..40
        tx.append(S, i, 0.0)
    tx.handle(ReplicationAck("b", S, 1, 3, "gap"), 0.0)
    assert tx.tick(0.0) == [] and tx.needs_resync == {("b", S)}
    tx.handle(ReplicationAck("b", S, 1, 20, "ok"), 0.0)  # re-seeded from a snapshot
    assert tx.needs_resync == set() and batches(tx.tick(0.0))[0].first_seq == 20


def test_ack_when_stale_epoch_from_newer_active_then_sender_fenced_until_new_epoch():
    tx = sender(epoch=5)
    tx.append(S, "x", 0.0)
    tx.handle(ReplicationAck("b", S, 6, 1, "stale_epoch"), 0.0)
    assert tx.fenced and tx.tick(1.0) == []
    with pytest.raises(ValueError, match="epoch=4"):
        tx.set_epoch(4)
    tx.set_epoch(7)
    assert not tx.fenced and batches(tx.tick(1.0))[0].epoch == 7


def test_add_standby_when_late_then_sent_retained_records_and_remove_stops_it():
    tx = sender(standbys=())
    for i in range(3):
        tx.append(S, i, 0.0)
    tx.add_standby("c")
    assert [(o.to, o.message.first_seq) for o in tx.tick(1.0)] == [("c", 1)]
    tx.remove_standby("c")
    tx.append(S, 9, 1.0)
    assert tx.tick(2.0) == []


# --------------------------------------------------------------------------------------------
# Receiver
# --------------------------------------------------------------------------------------------


def test_receive_when_in_order_then_applied_and_duplicates_dropped():
    sb = Standby()
    ack = sb.rx.handle(batch(1, 1, ("a", "b")), 0.0)
    assert (ack.status, ack.next_seq, ack.epoch) == ("ok", 3, 1)
    ack = sb.rx.handle(batch(1, 2, ("b", "c")), 0.0)
    assert ack.next_seq == 4 and sb.seqs() == [1, 2, 3]
    assert [r.record for r in sb.journal] == ["a", "b", "c"]
    assert sb.rx.counters["duplicates"] == 1


def test_receive_when_gap_then_nothing_applied_and_asks_from_last_seq():
    sb = Standby(next_seqs={S: 5}, histories={S: [(2, 1)]})
    ack = sb.rx.handle(batch(2, 7, ("x",)), 0.0)
    assert (ack.status, ack.next_seq) == ("gap", 5) and sb.journal == []


def test_receive_when_epoch_below_highest_then_refused_as_fenced_old_active():
    sb = Standby()
    sb.rx.handle(batch(6, 1, ("n1",), source="new"), 0.0)
    ack = sb.rx.handle(batch(5, 2, ("o2",), source="old"), 0.0)
    assert (ack.status, ack.epoch, ack.next_seq) == ("stale_epoch", 6, 2)
    assert [r.record for r in sb.journal] == ["n1"]


def test_receive_when_newer_active_lacks_old_tail_then_diverged_until_truncated():
    # the old active (epoch 5) sent this standby 1..5; the promoted one had only 1..3
    sb = Standby(next_seqs={S: 6}, histories={S: [(5, 1)]})
    new = batch(6, 4, ("n4", "n5", "n6"), history=([5, 1], [6, 4]), source="new")
    ack = sb.rx.handle(new, 0.0)
    assert ack.status == "diverged" and sb.rx.diverged == {S: 4} and sb.journal == []
    sb.rx.truncate(S, sb.rx.diverged[S])
    ack = sb.rx.handle(new, 0.0)
    assert (ack.status, ack.next_seq, ack.epoch) == ("ok", 7, 6) and sb.seqs() == [4, 5, 6]
    assert [r.epoch for r in sb.journal] == [6, 6, 6]
    assert sb.rx.histories[S] == [(5, 1), (6, 4)]
    assert sb.rx.handle(batch(5, 7, ("o7",)), 0.0).status == "stale_epoch"
    with pytest.raises(ValueError, match="next_seq=9"):
        sb.rx.truncate(S, 9)


def test_receive_when_divergence_is_from_an_epoch_it_never_saw_then_found_at_that_run():
    # this standby missed epoch 5 entirely: its 4..5 came from epoch 4, the sender's from 5
    sb = Standby(next_seqs={S: 6}, histories={S: [(4, 1)]})
    ack = sb.rx.handle(batch(6, 8, ("n8",), history=([4, 1], [5, 4], [6, 8])), 0.0)
    assert ack.status == "diverged" and sb.rx.diverged == {S: 4}


def test_receive_when_newer_epoch_continues_at_next_seq_then_accepted():
    sb = Standby(next_seqs={S: 4}, histories={S: [(5, 1)]})
    ack = sb.rx.handle(batch(6, 4, ("n4",), history=([5, 1], [6, 4])), 0.0)
    assert (ack.status, ack.epoch, sb.seqs()) == ("ok", 6, [4])


def test_receive_when_history_malformed_then_error_names_history():
    sb = Standby()
    with pytest.raises(LeaseMessageError, match="history"):
        sb.rx.handle(batch(1, 1, ("x",), history=([1, 5], [2, 3])), 0.0)


def test_receive_when_apply_raises_then_position_stays_at_failed_record():
    seen = []

    def apply(r: ReplicatedRecord) -> None:
        if r.seq == 2:
            raise OSError("journal write failed")
        seen.append(r.seq)

    rx = ReplicationReceiver("b", apply)
    with pytest.raises(OSError):
        rx.handle(batch(1, 1, ("x", "y", "z")), 0.0)
    assert seen == [1] and rx.next_seqs[S] == 2


def test_sender_when_receiver_truncates_after_divergence_then_resends_from_there():
    promoted = Standby("b", next_seqs={S: 4}, histories={S: [(5, 1)]})
    tx = ReplicationSender.from_receiver(promoted.rx, "b", ["c"], CFG, epoch=6)
    sb = Standby("c", next_seqs={S: 6}, histories={S: [(5, 1)]})
    for i in (4, 5):
        assert tx.append(S, f"n{i}", 0.0) == i
    [b] = batches(tx.tick(0.1))
    assert b.history == ([5, 1], [6, 4])
    tx.handle(sb.rx.handle(b, 0.1), 0.1)
    assert tx.lag("c", 0.1).records == 2
    sb.rx.truncate(S, sb.rx.diverged[S])
    for o in tx.tick(0.7):  # ack timeout: resend
        tx.handle(sb.rx.handle(o.message, 0.7), 0.7)
    assert sb.seqs() == [4, 5] and tx.lag("c", 0.7) == Lag(0, 0.0)


def test_sender_when_continuing_a_journal_without_its_history_then_error():
    with pytest.raises(ValueError, match=r"histories\['ledger'\]"):
        ReplicationSender("b", ["c"], CFG, epoch=6, next_seqs={S: 4})


# --------------------------------------------------------------------------------------------
# Seeded simulation: lossy, reordering, duplicating links; a failover to a new epoch
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_replicate_when_links_lose_reorder_duplicate_and_fail_over_then_standbys_match_active(
        seed):
    """Active ``a`` (epoch 5) replicates two streams to ``b`` and ``c``; halfway, ``b`` is
    promoted (epoch 6) and replicates to ``c`` and to ``a2`` (the old active back as a standby,
    with its own journal), while the cut-off old copy keeps sending for a while. At the end
    every standby's journal equals the new active's, record for record."""
    rng = random.Random(seed)
    cfg = ReplicationConfig(batch_max_records=8, linger_s=0.005, ack_timeout_s=0.1,
                            max_in_flight_records=32, backlog_records=10_000)
    standbys = {n: Standby(n) for n in ("b", "c")}
    old = ReplicationSender("a", standbys, cfg, epoch=5)
    tx = old
    active_journal: dict[str, list] = {S: [], "risk": []}  # what the active wrote, in order
    old_journal: dict[str, list] = {S: [], "risk": []}
    queue: list[tuple[float, int, str, object]] = []
    order = itertools.count()
    now_s, tail, divergences = 0.0, {}, 0

    def send(out) -> None:
        for o in out:
            if rng.random() < 0.15:
                continue  # lost
            for _ in range(2 if rng.random() < 0.05 else 1):  # sometimes duplicated
                at = now_s + rng.uniform(0, 0.03)  # reordered
                heapq.heappush(queue, (at, next(order), o.to, o.message))

    def caught_up() -> bool:
        return tx is not old and all(tx.lag(n, now_s).records == 0 for n in standbys)

    for step in range(20_000):  # appends stop at 2500; then until caught up (or fail below)
        if step > 2500 and caught_up():
            break
        now_s += 0.001
        if step == 1500:  # failover
            promoted = standbys.pop("b")
            tail = dict(promoted.rx.next_seqs)
            active_journal = {st: [r.record for r in promoted.journal if r.stream == st]
                              for st in active_journal}
            a2 = Standby("a2", next_seqs={st: len(v) + 1 for st, v in old_journal.items()},
                         histories={st: [(5, 1)] for st, v in old_journal.items() if v})
            a2.journal.extend(ReplicatedRecord(st, i + 1, 5, r)
                              for st, v in old_journal.items() for i, r in enumerate(v))
            standbys["a2"] = a2
            tx = ReplicationSender.from_receiver(promoted.rx, "b", ["c", "a2"], cfg, epoch=6)
            for st, records in active_journal.items():  # for standbys behind b
                if records:
                    tx.preload(st, records, now_s)
        if step < 2500 and rng.random() < 0.5:
            stream = rng.choice(sorted(active_journal))
            record = (stream, step)
            assert tx.append(stream, record, now_s) == len(active_journal[stream]) + 1
            active_journal[stream].append(record)
            if tx is old:
                old_journal[stream].append(record)
        if tx is old or rng.random() < 0.3:  # the cut-off old copy keeps sending
            send(old.tick(now_s))
        if tx is not old:
            send(tx.tick(now_s))
        while queue and queue[0][0] <= now_s:
            _, _, to, msg = heapq.heappop(queue)
            if isinstance(msg, ReplicationAck):
                (old if to == "a" else tx).handle(msg, now_s)
            elif to in standbys:
                sb = standbys[to]
                ack = sb.rx.handle(msg, now_s)
                if ack.status == AckStatus.DIVERGED:  # the application drops the bad tail
                    cut = sb.rx.diverged[msg.stream]
                    sb.journal[:] = [r for r in sb.journal
                                     if r.stream != msg.stream or r.seq < cut]
                    sb.rx.truncate(msg.stream, cut)
                    divergences += 1
                send([Outgoing(msg.source, ack)])
    for name, sb in standbys.items():
        for stream, records in active_journal.items():
            mine = [r for r in sb.journal if r.stream == stream]
            assert [r.record for r in mine] == records, (name, stream)
            assert [r.seq for r in mine] == list(range(1, len(records) + 1))
            assert {r.epoch for r in mine if r.seq >= tail.get(stream, 1)} <= {6}
        assert tx.lag(name, now_s) == Lag(0, 0.0) and not tx.needs_resync
    assert step < 4500, f"caught up only after {step} steps"
    assert old.fenced
    assert divergences >= 1  # a2 held records b never had


def test_preload_when_promoted_then_serves_standbys_behind_it_and_refuses_after_append():
    promoted = Standby("b", next_seqs={S: 4}, histories={S: [(5, 1)]})
    tx = ReplicationSender.from_receiver(promoted.rx, "b", ["c"], CFG, epoch=6)
    tx.preload(S, ["r1", "r2", "r3"], now_s=0.0)
    [b] = batches(tx.tick(CFG.linger_s))
    assert (b.first_seq, b.records) == (1, ("r1", "r2", "r3"))
    sb = Standby("c")
    ack = sb.rx.handle(b, 0.0)
    assert [r.epoch for r in sb.journal] == [5, 5, 5] and ack.next_seq == 4
    tx.append(S, "n4", 0.0)
    with pytest.raises(ValueError, match="preload"):
        tx.preload(S, ["r1"], 0.0)
