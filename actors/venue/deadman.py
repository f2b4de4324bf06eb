"""The venue's dead-man's switch: a countdown that cancels an account's orders unless re-armed.

Like BitMEX ``cancelAllAfter``, OKX ``cancel-all-after`` and Binance ``countdownCancelAll``:
``private/cancel_all_after(timeout, label_prefix="")`` starts (or restarts) a countdown of
``timeout`` milliseconds; when it runs out the venue cancels the account's open and untriggered
orders whose label starts with ``label_prefix`` (``""``: every order of the account), with
``cancel_reason`` ``"deadman"``, and the switch disarms. A client that is frozen or cut off while
its TCP connection stays up (a stopped process, a partition that leaves the socket open) can
re-arm nothing, so its orders go — cancel-on-disconnect cannot see that case.

Rules:

* one switch per ``(account, label_prefix)``; calling again with the same prefix re-arms it (the
  countdown starts over from now); ``timeout=0`` disarms it; the switches of other prefixes and
  other accounts are untouched. A site arms the prefix of its own epoch (``e<epoch>.<conn>.``)
  and so can never cancel the orders of the site that took over on the same account;
* ``timeout``: an int, 0 or ``MIN_TIMEOUT_MS``..``MAX_TIMEOUT_MS``; ``label_prefix``: a string
  of at most ``MAX_LABEL_LENGTH`` characters; at most ``MAX_SWITCHES_PER_ACCOUNT`` armed per
  account. Anything else is refused with ``Invalid params`` naming the param;
* the answer: ``{"armed", "timeout", "trigger_time" (venue ms, None when disarmed),
  "label_prefix", "now"}``; ``private/get_cancel_all_after`` lists the account's armed switches;
* the countdown runs on the venue's clock: the server calls :meth:`DeadmanSwitches.fire_due`
  from its periodic loop (every ``md_interval_s``), so a switch fires within one interval of
  its trigger time whether or not the client sends anything. During an outage the venue's
  cancels are refused: a due switch stays armed and fires on the first tick after it;
* counted in ``counts`` (``arms``, ``rearms``, ``disarms``, ``fired``, ``cancelled``,
  ``deferred``), shown by ``public/simulator/status`` under ``deadman``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from actors.venue.clock import Clock, to_ms
from actors.venue.engine import VenueEngine
from actors.venue.jsonrpc import Param, RpcError, invalid_params
from actors.venue.records import Rejection
from actors.venue.validation import MAX_LABEL_LENGTH

MIN_TIMEOUT_MS = 100
MAX_TIMEOUT_MS = 600_000  # 10 minutes
MAX_SWITCHES_PER_ACCOUNT = 16
CANCEL_REASON = "deadman"

PARAMS = (Param("timeout", "int", True), Param("label_prefix", "str", False, ""))


@dataclass(frozen=True)
class Switch:
    """One armed switch: whose orders, which labels, and when it fires (venue clock, s)."""

    account: str
    label_prefix: str
    timeout_ms: int
    trigger_s: float

    def to_deribit(self) -> dict[str, object]:
        return {"armed": True, "timeout": self.timeout_ms, "trigger_time": to_ms(self.trigger_s),
                "label_prefix": self.label_prefix}


class DeadmanSwitches:
    """Every armed switch of the venue (module doc); plain Python on an injected clock."""

    def __init__(self, engine: VenueEngine, clock: Clock) -> None:
        self._engine = engine
        self._clock = clock
        self._armed: dict[tuple[str, str], Switch] = {}
        self.counts: Counter[str] = Counter()

    def arm(self, account: str, params: dict[str, object]) -> dict[str, object] | RpcError:
        """``private/cancel_all_after`` with checked params (``PARAMS``)."""
        timeout, prefix = params["timeout"], params["label_prefix"]
        assert isinstance(timeout, int) and isinstance(prefix, str)
        if timeout != 0 and not MIN_TIMEOUT_MS <= timeout <= MAX_TIMEOUT_MS:
            return invalid_params(
                f"timeout_must_be_0_or_{MIN_TIMEOUT_MS}_to_{MAX_TIMEOUT_MS}_ms", "timeout")
        if len(prefix) > MAX_LABEL_LENGTH:
            return invalid_params(f"label_prefix_longer_than_{MAX_LABEL_LENGTH}", "label_prefix")
        key, now_s = (account, prefix), self._clock.now_s()
        if timeout == 0:
            self.counts["disarms" if self._armed.pop(key, None) else "disarms_idle"] += 1
            return {"armed": False, "timeout": 0, "trigger_time": None, "label_prefix": prefix,
                    "now": to_ms(now_s)}
        if key not in self._armed and sum(a == account for a, _ in self._armed) >= \
                MAX_SWITCHES_PER_ACCOUNT:
            return invalid_params(f"more_than_{MAX_SWITCHES_PER_ACCOUNT}_switches_armed",
                                  "label_prefix")
        self.counts["rearms" if key in self._armed else "arms"] += 1
        switch = self._armed[key] = Switch(account, prefix, timeout, now_s + timeout / 1000.0)
        return {**switch.to_deribit(), "now": to_ms(now_s)}

    def armed(self, account: str) -> list[dict[str, object]]:
        """``private/get_cancel_all_after``: the account's armed switches, soonest first."""
        mine = sorted((s for s in self._armed.values() if s.account == account),
                      key=lambda s: s.trigger_s)
        return [s.to_deribit() for s in mine]

    def fire_due(self) -> list[str]:
        """Cancel the orders of every switch whose countdown has run out and disarm it;
        returns the accounts whose orders changed (the server notifies them)."""
        now_s = self._clock.now_s()
        accounts: dict[str, None] = {}
        for key, switch in [(k, s) for k, s in self._armed.items() if s.trigger_s <= now_s]:
            out = self._engine.cancel_all(switch.account, label_prefix=switch.label_prefix,
                                          reason=CANCEL_REASON)
            if isinstance(out, Rejection):  # an outage: fire on the first tick after it
                self.counts["deferred"] += 1
                continue
            del self._armed[key]
            self.counts["fired"] += 1
            self.counts["cancelled"] += out
            if out:
                accounts[switch.account] = None
        return list(accounts)

    def status(self) -> dict[str, int]:
        return {"armed": len(self._armed), **self.counts}
