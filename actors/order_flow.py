"""OrderFlow: a client's stream of small market orders into one connector, recording every
outcome — the order flow the multi-site failover tests and demo watch (which site's orders were
accepted, when, under which epoch). Not a strategy: it alternates buy and sell of ``amount``,
one order every ``interval_s``, and never retries (a refused order is recorded as refused)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any


class OrderFlow:
    def __init__(self, connector: str, instrument: str = "BTC-PERPETUAL", amount: float = 10.0,
                 interval_s: float = 0.05, keep: int = 20_000) -> None:
        self.connector = connector
        self.instrument = instrument
        self.amount = amount
        self.interval_s = interval_s
        self.keep = keep
        self.outcomes: list[dict[str, Any]] = []
        self.counts: Counter[str] = Counter()
        self._task: asyncio.Task[None] | None = None
        self._n = 0

    async def on_started(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        import ray

        from supervisors import current_context

        ctx = current_context()
        namespace = ctx.namespace if ctx else None
        handle = None
        while True:
            await asyncio.sleep(self.interval_s)
            self._n += 1
            order = {"instrument": self.instrument, "amount": self.amount, "type": "market",
                     "direction": "buy" if self._n % 2 else "sell"}
            sent = time.time()
            try:
                if handle is None:
                    handle = ray.get_actor(self.connector, namespace=namespace)
                out = await asyncio.wait_for(handle.submit.remote(order, 0.0), 10.0)
            except Exception as exc:  # noqa: BLE001 - recorded; the flow goes on
                handle = None
                out = {"status": "error", "reason": repr(exc)[:200]}
            self.counts[out.get("status", "?")] += 1
            self.outcomes.append({"sent_wall_s": sent, "done_wall_s": time.time(),
                                  "status": out.get("status"), "label": out.get("label"),
                                  "reason": str(out.get("reason", ""))[:200]})
            del self.outcomes[:-self.keep]

    def stats(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "sent": self._n}

    def history(self) -> list[dict[str, Any]]:
        return list(self.outcomes)

    def __repr__(self) -> str:
        return f"OrderFlow({self.connector} {dict(self.counts)})"
