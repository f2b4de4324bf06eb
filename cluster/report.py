"""The resilience report of a run: a timeline picture (PNG, and an HTML page around it) and the
table of detection and recovery times, with the checker's verdict.

Everything comes from the run's history (``cluster.history``): ``fault`` / ``fault_end`` (what
was injected, and undone), ``detected`` (who noticed, when), ``recovered``, ``restart`` /
``migration`` (the supervisors' side), ``role`` (which site was active when: failovers),
``alert`` and ``pnl``. Times in the table are from a fault's injection:

* detection: to its first ``detected`` event (the mesh declaring a node down, a supervisor
  seeing a child die, a site losing its lease, ...);
* recovery: to its ``recovered`` event (the child running again, the standby trading, ...).

Per fault kind: count, p50 / p99 / max of both, and how many recovered within their bound.

    report = build_report("run/history.jsonl", "run/report")   # report.png, report.html
    print_summary(report)
"""

from __future__ import annotations

import base64
import html
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.checker import Verdict, check
from cluster.history import History, load_history

__all__ = ["FaultRow", "Report", "build_report", "print_summary"]


def _pct(values: Sequence[float], q: float) -> float | None:
    ordered = sorted(v for v in values if v is not None and math.isfinite(v))
    if not ordered:
        return None
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))]


@dataclass
class FaultRow:
    """The faults of one kind: how long detection and recovery took."""

    kind: str
    count: int = 0
    detection_s: list[float] = field(default_factory=list)
    recovery_s: list[float] = field(default_factory=list)
    within_bound: int = 0
    unrecovered: int = 0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "count": self.count,
                               "within_bound": self.within_bound,
                               "unrecovered": self.unrecovered}
        for name, values in (("detection", self.detection_s), ("recovery", self.recovery_s)):
            out[f"{name}_p50_s"] = _pct(values, 50)
            out[f"{name}_p99_s"] = _pct(values, 99)
            out[f"{name}_max_s"] = max(values) if values else None
        return out


@dataclass
class Report:
    rows: list[FaultRow]
    verdict: Verdict
    png: Path | None
    html: Path | None
    counts: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {"faults": [r.to_dict() for r in self.rows], "passed": self.verdict.passed,
                "failed_checks": self.verdict.failed, "counts": self.counts,
                "png": str(self.png) if self.png else None,
                "html": str(self.html) if self.html else None}


def fault_rows(h: History) -> list[FaultRow]:
    """Detection and recovery per fault kind (see the module docstring)."""
    detected: dict[str, float] = {}
    for e in h.of("detected"):
        detected.setdefault(e["fault_id"], e["ts"])
    recovered: dict[str, float] = {}
    for e in h.of("recovered"):
        recovered.setdefault(e["fault_id"], e["ts"])
    rows: dict[str, FaultRow] = {}
    for f in h.of("fault"):
        row = rows.setdefault(f["kind"], FaultRow(f["kind"]))
        row.count += 1
        if f["id"] in detected:
            row.detection_s.append(max(0.0, detected[f["id"]] - f["ts"]))
        if f["id"] in recovered:
            took = max(0.0, recovered[f["id"]] - f["ts"])
            row.recovery_s.append(took)
            row.within_bound += took <= f["bound_s"]
        else:
            row.unrecovered += 1
    return sorted(rows.values(), key=lambda r: r.kind)


def _timeline(h: History, path: Path, title: str) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stamps = [e["ts"] for e in h.events if isinstance(e.get("ts"), (int, float))]
    if not stamps:
        return None
    t0 = min(stamps)
    fig, (ax, ax_pnl) = plt.subplots(2, 1, figsize=(13, 7), sharex=True,
                                     gridspec_kw={"height_ratios": [3, 1]})
    lanes: list[str] = []

    def lane(name: str) -> int:
        if name not in lanes:
            lanes.append(name)
        return lanes.index(name)

    ends = {e["fault_id"]: e["ts"] for e in h.of("fault_end")}
    recovered = {e["fault_id"]: e["ts"] for e in h.of("recovered")}
    for f in h.of("fault"):
        y = lane(f"fault: {f['kind']}")
        end = ends.get(f["id"], recovered.get(f["id"], f["ts"] + 0.5))
        ax.barh(y, max(0.2, end - f["ts"]), left=f["ts"] - t0, height=0.5, color="tab:red",
                alpha=0.6)
        ax.annotate(str(f["target"])[-18:], (f["ts"] - t0, y + 0.3), fontsize=6)
    for kind, color, marker in (("detected", "tab:orange", "v"), ("recovered", "tab:green", "^")):
        xs = [e["ts"] - t0 for e in h.of(kind)]
        if xs:
            ax.scatter(xs, [lane(kind)] * len(xs), color=color, marker=marker, s=25)
    for kind, color in (("restart", "tab:blue"), ("migration", "tab:purple"),
                        ("alert", "tab:brown")):
        xs = [e["ts"] - t0 for e in h.of(kind)]
        if xs:
            ax.scatter(xs, [lane(kind)] * len(xs), color=color, marker="|", s=120)
    # which site was active, per resource: a band per role interval
    roles = sorted(h.of("role"), key=lambda e: e["ts"])
    active: dict[tuple[str, str], float] = {}
    palette = ["tab:cyan", "tab:olive", "tab:pink", "tab:gray"]
    sites = sorted({e["site"] for e in roles})
    for e in roles + [{"ts": max(stamps), "state": "end", "site": s, "resource": r}
                      for (s, r) in {(x["site"], x["resource"]) for x in roles}]:
        key = (e["site"], e["resource"])
        if e["state"] == "active":
            active.setdefault(key, e["ts"])
        elif key in active:
            start = active.pop(key)
            y = lane(f"active: {e['resource']}")
            ax.barh(y, e["ts"] - start, left=start - t0, height=0.5,
                    color=palette[sites.index(e["site"]) % len(palette)], alpha=0.8,
                    label=f"{e['site']} active")
    ax.set_yticks(range(len(lanes)), lanes, fontsize=8)
    ax.set_title(title)
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        uniq = dict(zip(labels, handles, strict=False))
        ax.legend(uniq.values(), uniq.keys(), fontsize=7, loc="upper right")
    ax.grid(axis="x", alpha=0.3)
    books: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for e in h.of("pnl"):
        books[e["book"]].append((e["ts"] - t0, e["value"]))
    for book, points in sorted(books.items()):
        points.sort()
        ax_pnl.plot([p[0] for p in points], [p[1] for p in points], label=book)
    ax_pnl.set_ylabel("P&L (USD)")
    ax_pnl.set_xlabel("seconds since the run started")
    if books:
        ax_pnl.legend(fontsize=7)
    ax_pnl.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _html(report: Report, title: str, path: Path) -> Path:
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in (
            d["kind"], d["count"], d["detection_p50_s"], d["detection_p99_s"],
            d["detection_max_s"], d["recovery_p50_s"], d["recovery_p99_s"],
            d["recovery_max_s"], f"{d['within_bound']}/{d['count']}")) + "</tr>"
        for d in (r.to_dict() for r in report.rows))
    checks = "".join(
        f"<tr><td>{html.escape(c.name)}</td><td class={'ok' if c.passed else 'bad'}>"
        f"{'PASS' if c.passed else 'FAIL'}</td><td>{html.escape(str(c.counts))}</td>"
        f"<td>{html.escape('; '.join(v.detail for v in c.violations[:3]))}</td></tr>"
        for c in report.verdict.checks)
    img = ""
    if report.png and report.png.exists():
        data = base64.b64encode(report.png.read_bytes()).decode()
        img = f'<img alt="timeline" src="data:image/png;base64,{data}">'
    verdict = "PASS" if report.verdict.passed else "FAIL: " + ", ".join(report.verdict.failed)
    path.write_text(f"""<!doctype html><html><head><meta charset="utf-8">
<title>{html.escape(title)}</title><style>
body {{ font-family: sans-serif; margin: 2em; }} table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; font-size: 13px; }}
.ok {{ color: #070; font-weight: bold; }} .bad {{ color: #b00; font-weight: bold; }}
img {{ max-width: 100%; }}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Verdict: <span class={'ok' if report.verdict.passed else 'bad'}>{html.escape(verdict)}</span>
&middot; events: {html.escape(str(report.counts))}</p>
{img}
<h2>Detection and recovery (seconds from the fault)</h2>
<table><tr><th>fault</th><th>n</th><th>detect p50</th><th>p99</th><th>max</th>
<th>recover p50</th><th>p99</th><th>max</th><th>within bound</th></tr>{rows}</table>
<h2>Invariants</h2><table><tr><th>check</th><th></th><th>counts</th><th>first violations</th>
</tr>{checks}</table></body></html>
""")
    return path


def build_report(history: str | Path | History, out_dir: str | Path, *,
                 title: str = "Bastion resilience report") -> Report:
    """Write ``report.png`` and ``report.html`` into ``out_dir``; return the figures."""
    h = history if isinstance(history, History) else load_history(history)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {k: len(h.of(k)) for k in ("fault", "detected", "recovered", "restart",
                                        "migration", "role", "alert", "venue_order", "fill")}
    report = Report(fault_rows(h), check(h), None, None, counts)
    report.png = _timeline(h, out / "report.png", title)
    report.html = _html(report, title, out / "report.html")
    return report


def print_summary(report: Report) -> None:
    """The table and the verdict on the terminal (rich)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Detection and recovery (s from the fault)")
    for col in ("fault", "n", "detect p50", "p99", "max", "recover p50", "p99", "max",
                "in bound"):
        table.add_column(col, justify="right" if col != "fault" else "left", no_wrap=True)
    for d in (r.to_dict() for r in report.rows):
        table.add_row(d["kind"], str(d["count"]), *(_fmt(d[k]) for k in (
            "detection_p50_s", "detection_p99_s", "detection_max_s", "recovery_p50_s",
            "recovery_p99_s", "recovery_max_s")), f"{d['within_bound']}/{d['count']}")
    console = Console(width=max(110, Console().width))  # a pipe reports 80 columns
    console.print(table)
    verdict = report.verdict
    console.print(f"checker: [{'green' if verdict.passed else 'red'}]"
                  f"{'PASS' if verdict.passed else 'FAIL ' + ', '.join(verdict.failed)}[/]")
    if report.html:
        console.print(f"report: {report.html} (timeline {report.png})")
