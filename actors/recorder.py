"""MarkRecorder: a plain subscriber of a connector's batches (marks and fills), with an optional
processing delay to play a slow consumer. Used by tests and benchmarks of the data path."""

from __future__ import annotations

import time
from typing import Any

import numpy as np


class MarkRecorder:
    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.batches = 0
        self.rows = 0
        self.fills = 0
        self.latest: dict[str, float] = {}
        self.max_batch_rows = 0
        self.received_at: list[float] = []
        self.lags_s: list[float] = []  # connector publish time -> processed here

    def on_marks(self, batch: dict[str, Any]) -> int:
        if self.delay_s:
            time.sleep(self.delay_s)  # a deliberately slow consumer
        names = np.asarray(batch["instrument"])
        marks = np.asarray(batch["mark_price"], dtype=np.float64)
        for name, mark in zip(names.tolist(), marks.tolist(), strict=True):
            self.latest[name] = mark
        self.batches += 1
        self.rows += len(names)
        self.max_batch_rows = max(self.max_batch_rows, len(names))
        now = time.time()
        self.received_at.append(now)
        del self.received_at[:-1000]
        if "ts" in batch:
            self.lags_s.append(now - float(batch["ts"]))
            del self.lags_s[:-10_000]
        return self.batches

    def on_fills(self, fills: list[dict[str, Any]]) -> int:
        self.fills += len(fills)
        return self.fills

    def stats(self) -> dict[str, Any]:
        gaps = np.diff(self.received_at) if len(self.received_at) > 1 else np.array([0.0])
        return {"batches": self.batches, "rows": self.rows, "fills": self.fills,
                "latest": dict(self.latest), "max_batch_rows": self.max_batch_rows,
                "max_gap_s": float(gaps.max()), "lags_s": list(self.lags_s)}
