"""History events from the real sources of a run (see ``cluster.history`` for the kinds).

Each collector reads one source and returns event dicts (write them with
``HistoryWriter.extend``); none of them imports Ray: hand them what the actors answered.

* :func:`collect_venue` — the venue's own record over its API (``rpc``, e.g.
  :func:`venue_rpc`): its order log (``private/simulator/order_log``: every buy/sell request
  with its outcome), its trades (``private/get_user_trades_by_instrument``) and its positions.
* :func:`collect_journal` — a connector's journal stream (``supervisors.journal``): intents,
  acks and fills (``actors.connector_core.Ledger`` events), the seqs present and any gap or
  corrupt record; the fills of the newest snapshot when the stream is compacted.
* :func:`collect_connector` / :func:`collect_risk_book` — what ``VenueConnector.positions()``
  / ``fills()`` and ``RiskBook.positions()`` / ``limit_history()`` answered.
* :func:`collect_tree` — restarts and migrations, by comparing two ``Tree.describe()``
  snapshots (or, with no earlier one, every child that has restarted).
* :func:`collect_role_log` / :func:`collect_roles` — role and lease events from a site
  controller's ``role_log`` (activate / renew / deactivate, wall times) or from
  ``SiteRoles.status()`` changes (on the roles' monotonic clock: pass the offset to wall time).
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .history import label_epoch, label_site

Rpc = Callable[[str, Mapping[str, Any]], Any]
Event = dict[str, Any]

#: Records probed past a gap before a journal read gives up (each gap costs one probe per seq).
MAX_GAP_PROBES = 10_000


class VenueCallError(RuntimeError):
    """The venue answered a JSON-RPC error (``code``, ``message``, ``data``)."""

    def __init__(self, method: str, error: Mapping[str, Any]) -> None:
        self.method, self.code = method, error.get("code")
        super().__init__(f"{method}: {error.get('code')} {error.get('message')} "
                         f"{error.get('data') or ''}".strip())


def venue_rpc(http_url: str, client_id: str, client_secret: str, *,
              timeout_s: float = 10.0, clock: Callable[[], float] = time.time) -> Rpc:
    """A blocking JSON-RPC caller over the venue's HTTP API, signed ``deri-hmac-sha256``
    (the secret never travels). Raises :class:`VenueCallError` on an error answer."""
    from actors.venue.auth import hmac_authorization

    def call(method: str, params: Mapping[str, Any]) -> Any:
        path = f"/api/v2/{method}"
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method,
                           "params": dict(params)})
        headers = {"Content-Type": "application/json"}
        if method.startswith("private/"):
            headers["Authorization"] = hmac_authorization(
                client_id, client_secret, "POST", path, body,
                timestamp_ms=int(clock() * 1000))
        req = urllib.request.Request(http_url + path, data=body.encode(), headers=headers,
                                     method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                reply = json.loads(resp.read())
        except urllib.error.HTTPError as err:
            reply = json.loads(err.read())
        if "error" in reply:
            raise VenueCallError(method, reply["error"])
        return reply["result"]

    return call


def _signed(direction: str, amount: float) -> float:
    return float(amount) if direction == "buy" else -float(amount)


# --------------------------------------------------------------------------------------------
# the venue
# --------------------------------------------------------------------------------------------
def collect_venue(rpc: Rpc, venue: str, account: str, *,
                  instruments: Iterable[str] | None = None, resource: str | None = None,
                  page: int = 1000, now_s: Callable[[], float] = time.time) -> list[Event]:
    """``venue_order`` events from the order log, ``fill`` (source venue) from the trades of
    ``instruments`` (default: every instrument the account has a position record on) and
    ``position`` (source venue). ``resource``: the lease these orders fall under (default
    the venue's name)."""
    out: list[Event] = []
    after = 0
    while True:
        got = rpc("private/simulator/order_log", {"after_seq": after, "count": page})
        for o in got["entries"]:
            event: Event = {
                "t": "venue_order", "ts": o["timestamp"] / 1000.0, "venue": venue,
                "account": account, "label": o["label"], "outcome": o["outcome"],
                "reason": o["reason"], "order_id": o["order_id"], "seq": o["seq"],
                "instrument": o["instrument_name"], "direction": o["direction"],
                "amount": o["amount"], "price": o["price"], "type": o["type"],
                "epoch": label_epoch(o["label"]), "site": label_site(o["label"])}
            if resource is not None:
                event["resource"] = resource
            out.append(event)
        if not got["has_more"] or not got["entries"]:
            break
        after = got["entries"][-1]["seq"]
    positions = rpc("private/get_positions", {})
    taken = now_s()
    names = list(instruments) if instruments is not None else [
        p["instrument_name"] for p in positions]
    for name in names:
        start = 1
        while True:
            got = rpc("private/get_user_trades_by_instrument",
                      {"instrument_name": name, "start_seq": start, "count": page,
                       "sorting": "asc"})
            for tr in got["trades"]:
                out.append({"t": "fill", "ts": tr["timestamp"] / 1000.0, "source": "venue",
                            "venue": venue, "account": account,
                            "trade_id": str(tr["trade_id"]), "trade_seq": tr["trade_seq"],
                            "instrument": name, "amount": _signed(tr["direction"], tr["amount"]),
                            "price": tr["price"], "label": tr.get("label") or "",
                            "order_id": tr.get("order_id")})
            if not got.get("has_more") or not got["trades"]:
                break
            start = got["trades"][-1]["trade_seq"] + 1
    for p in positions:
        out.append({"t": "position", "ts": taken, "source": "venue", "venue": venue,
                    "account": account, "instrument": p["instrument_name"],
                    "value": float(p["size"])})
    return out


# --------------------------------------------------------------------------------------------
# a connector's journal, positions and fills
# --------------------------------------------------------------------------------------------
def _fill_event(f: Mapping[str, Any], venue: str, account: str, ts: float) -> Event:
    """A ``fill`` (source connector) from a Ledger fill event."""
    ts_ms = f.get("ts_ms")
    return {"t": "fill", "ts": ts_ms / 1000.0 if ts_ms else ts, "source": "connector",
            "venue": venue, "account": account, "trade_id": str(f["trade_id"]),
            "trade_seq": f.get("trade_seq"), "instrument": f["instrument"],
            "amount": _signed(f["direction"], f["amount"]), "label": f.get("label") or ""}


def _runs(seqs: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for s in seqs:
        if runs and s == runs[-1][1] + 1:
            runs[-1][1] = s
        else:
            runs.append([s, s])
    return runs


def collect_journal(store: Any, stream: str, *, venue: str, account: str,
                    site: str | None = None, now_s: Callable[[], float] = time.time
                    ) -> list[Event]:
    """Events of one connector journal stream (``store``: a ``JournalStore``): ``order_sent``
    per intent, ``order_ack`` per ack, ``fill`` (source connector) per fill (and those of the
    newest snapshot when records were compacted away), and one ``journal`` event with the
    seqs present as runs, the corrupt seqs and ``last_seq``. A missing or corrupt record does
    not stop the read: it is left out of the runs (a gap) or listed in ``corrupt``."""
    import msgpack

    from supervisors.journal import CompactedError, CorruptRecordError

    taken = now_s()
    info = store.stream_info(stream)
    last = info.last_seq if info is not None else 0
    compacted = info.compacted_upto if info is not None else 0
    out: list[Event] = []
    if compacted:
        snap = store.latest_snapshot(stream)
        state = msgpack.unpackb(snap.payload, raw=False, strict_map_key=False) if snap else {}
        for f in state.get("fills", []) if isinstance(state, dict) else ():
            out.append(_fill_event(f, venue, account, taken))
    present: list[int] = []
    corrupt: list[int] = []

    def take(batches: Iterable[Any]) -> None:
        for batch in batches:
            for record in batch:
                present.append(record.seq)
                payload = msgpack.unpackb(record.payload, raw=False, strict_map_key=False)
                _journal_event(payload, record.seq, venue, account, site, taken, out)

    cursor, probes = compacted, 0
    while cursor < last and probes <= MAX_GAP_PROBES:
        try:
            take(store.iter_read(stream, after_seq=cursor))
            break
        except CorruptRecordError as exc:
            done = present[-1] if present and present[-1] > cursor else cursor
            if exc.seq - 1 > done:  # verified, but in the batch that raised: not yielded
                take(store.iter_read(stream, after_seq=done, limit=exc.seq - 1 - done))
            if not exc.reason.startswith("record is missing"):
                corrupt.append(exc.seq)
            cursor, probes = exc.seq, probes + 1
        except CompactedError:
            break
    out.append({"t": "journal", "ts": taken, "stream": stream, "venue": venue,
                "account": account, "last_seq": last, "compacted_upto": compacted,
                "ranges": _runs(present), "corrupt": corrupt, "records": len(present)})
    return out


def _journal_event(e: Any, seq: int, venue: str, account: str, site: str | None, ts: float,
                   out: list[Event]) -> None:
    if not isinstance(e, dict):
        return
    kind = e.get("t")
    label = str(e.get("label") or "")
    if kind in ("intent", "ack") and site and label_site(label) not in (None, site):
        # another site's order, imported from the replicated journal on promotion
        # (actors.connector_replica): that site sent it; its own stream has the intent
        return
    if kind == "intent":
        out.append({"t": "order_sent", "ts": ts, "venue": venue, "account": account,
                    "label": label, "site": site or label_site(label),
                    "epoch": label_epoch(label), "seq": seq,
                    "instrument": e.get("instrument"), "direction": e.get("direction"),
                    "amount": e.get("amount"), "price": e.get("price"), "type": e.get("type")})
    elif kind == "ack":
        out.append({"t": "order_ack", "ts": ts, "venue": venue, "account": account,
                    "label": str(e.get("label") or ""), "order_id": e.get("order_id"),
                    "state": e.get("state"), "seq": seq})
    elif kind == "fill" and "trade_id" in e:
        out.append({**_fill_event(e, venue, account, ts), "seq": seq})


def collect_connector(positions: Mapping[str, float], *, venue: str, account: str,
                      fills: Iterable[Mapping[str, Any]] = (),
                      now_s: Callable[[], float] = time.time) -> list[Event]:
    """``position`` (source connector) per instrument of ``VenueConnector.positions()`` and
    ``fill`` (source connector) per ledger fill of ``VenueConnector.fills()``."""
    taken = now_s()
    out: list[Event] = [{"t": "position", "ts": taken, "source": "connector", "venue": venue,
                         "account": account, "instrument": name, "value": float(value)}
                        for name, value in positions.items()]
    out += [_fill_event(f, venue, account, taken) for f in fills]
    return out


def collect_risk_book(positions: Iterable[Mapping[str, Any]], *, venue: str,
                      account: str = "*", book: str = "book",
                      limit_history: Iterable[Mapping[str, Any]] = (),
                      now_s: Callable[[], float] = time.time) -> list[Event]:
    """``position`` (source risk_book) per row of ``RiskBook.positions()`` (``account``
    ``"*"``: the book covers every account of ``venue``), ``limit_change`` per entry of
    ``RiskBook.limit_history()``."""
    taken = now_s()
    out: list[Event] = [{"t": "position", "ts": taken, "source": "risk_book", "venue": venue,
                         "account": account, "instrument": row["instrument"],
                         "value": float(row["size"]), "book": book} for row in positions]
    for change in limit_history:
        ts = change.get("ts")
        out.append({"t": "limit_change", "ts": float(ts) if ts is not None else taken,
                    "book": book, "who": change.get("who"), "why": change.get("why"),
                    "old": change.get("old"), "new": change.get("new")})
    return out


# --------------------------------------------------------------------------------------------
# supervision trees
# --------------------------------------------------------------------------------------------
def _children(tree: Mapping[str, Any]) -> Iterable[Mapping[str, Any]]:
    for child in tree.get("children", []):
        yield child
        if isinstance(child.get("tree"), Mapping):
            yield from _children(child["tree"])


def collect_tree(describe: Mapping[str, Any], previous: Mapping[str, Any] | None = None, *,
                 now_s: Callable[[], float] = time.time) -> list[Event]:
    """``restart`` and ``migration`` events from ``Tree.describe()``: against ``previous``
    (an earlier describe), one per child whose incarnation grew, plus a migration when its
    node changed; without one, one ``restart`` per child that has restarted at all."""
    taken = now_s()
    before = {c["actor_name"]: c for c in _children(previous)} if previous else None
    out: list[Event] = []
    for c in _children(describe):
        path = c["actor_name"]
        ts = c.get("started_at") or taken
        fields = {"child": path, "restarts": c.get("restarts", 0),
                  "incarnation": c.get("incarnation"), "node": c.get("node_id"),
                  "reason": c.get("last_failure"), "status": c.get("status")}
        if before is None:
            if c.get("restarts"):
                out.append({"t": "restart", "ts": ts, **fields})
            continue
        old = before.get(path)
        if old is None or (c.get("incarnation") or 0) <= (old.get("incarnation") or 0):
            continue
        out.append({"t": "restart", "ts": ts, **fields})
        if old.get("node_id") and c.get("node_id") and old["node_id"] != c["node_id"]:
            out.append({"t": "migration", "ts": ts, "child": path,
                        "from_node": old["node_id"], "to_node": c["node_id"],
                        "reason": c.get("last_failure")})
    return out


# --------------------------------------------------------------------------------------------
# site roles and leases
# --------------------------------------------------------------------------------------------
def collect_role_log(role_log: Iterable[Mapping[str, Any]]) -> list[Event]:
    """``role`` and ``lease`` events from a site controller's ``role_log``
    (``topology.ray_mesh``: ``activate`` / ``renew`` with ``valid_for_s``, ``deactivate``)."""
    out: list[Event] = []
    for r in role_log:
        base = {"ts": r["sent_wall_s"], "site": r["site"], "resource": r["resource"],
                "epoch": int(r["epoch"])}
        if r["kind"] == "activate":
            out.append({"t": "role", **base, "state": "active"})
        elif r["kind"] == "deactivate":
            out.append({"t": "role", **base, "state": "standby", "reason": r.get("reason")})
        if r["kind"] in ("activate", "renew") and r.get("valid_for_s") is not None:
            out.append({"t": "lease", **base,
                        "valid_until_ts": r["sent_wall_s"] + float(r["valid_for_s"])})
    return out


def collect_roles(status: Mapping[str, Any], *, wall_minus_clock_s: float) -> list[Event]:
    """``role`` events from ``SiteRoles.status()``: each recent holder change into ``active``
    opens, each change out of it closes. Its times are on the roles' clock; add
    ``wall_minus_clock_s`` (e.g. ``time.time() - time.monotonic()`` in that process)."""
    out: list[Event] = []
    site = status["site"]
    for resource, r in status.get("resources", {}).items():
        for c in r.get("changes", []):
            to, was = str(c["to"]).upper(), str(c["from"]).upper()
            state = ("active" if to == "ACTIVE" else "standby" if was == "ACTIVE" else None)
            if state is not None:
                out.append({"t": "role", "ts": c["ts_s"] + wall_minus_clock_s, "site": site,
                            "resource": resource, "epoch": int(c["epoch"]), "state": state,
                            "reason": c.get("reason")})
    return out
