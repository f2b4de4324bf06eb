"""The resilience report from a run history: the figures, the picture, the page."""

from __future__ import annotations

from pathlib import Path

from cluster.history import HistoryWriter
from cluster.report import build_report


def _history(path: Path, *, unrecovered: bool = False) -> Path:
    t = 1_700_000_000.0
    with HistoryWriter(path) as w:
        w.append("role", ts=t, site="tokyo", resource="deribit", epoch=1, state="active")
        for i, (detect, recover) in enumerate([(0.1, 1.0), (0.2, 2.0), (0.3, 3.0)]):
            fid = w.fault("kill_actor", f"site-tokyo/c{i}", bound_s=2.5, ts=t + 10 * i)
            w.append("detected", ts=t + 10 * i + detect, fault_id=fid, by="supervisor")
            w.append("restart", ts=t + 10 * i + recover, child=f"site-tokyo/c{i}")
            w.recovered(fid, ts=t + 10 * i + recover)
        fid = w.fault("cut_off_site", "tokyo", bound_s=6.0, ts=t + 40)
        w.append("detected", ts=t + 40.4, fault_id=fid, by="lease")
        w.append("role", ts=t + 40.9, site="tokyo", resource="deribit", epoch=1,
                 state="standby")
        w.append("role", ts=t + 41.2, site="london", resource="deribit", epoch=2,
                 state="active")
        if not unrecovered:
            w.recovered(fid, ts=t + 41.3)
        w.append("fault_end", ts=t + 45, fault_id=fid)
        for k in range(60):
            w.append("pnl", ts=t + k, book="main", value=float(k % 7 - 3))
    return path


def test_report_when_faults_detected_and_recovered_then_table_picture_page_and_the_late_one_flagged(
        tmp_path: Path) -> None:
    report = build_report(_history(tmp_path / "h.jsonl"), tmp_path / "out")
    rows = {r.kind: r.to_dict() for r in report.rows}
    kill = rows["kill_actor"]
    assert kill["count"] == 3 and kill["within_bound"] == 2  # 3.0 s is over its 2.5 s bound
    assert abs(kill["detection_p50_s"] - 0.2) < 1e-6 and abs(kill["recovery_max_s"] - 3.0) < 1e-6
    assert abs(rows["cut_off_site"]["recovery_p50_s"] - 1.3) < 1e-6
    png = report.png.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    page = report.html.read_text()
    assert "kill_actor" in page and "cut_off_site" in page and "data:image/png;base64" in page
    # the checker's verdict is in the page; the late recovery is its violation
    assert ("FAIL" in page) == (not report.verdict.passed)
    assert report.verdict.check("recovery").violation_count == 1


def test_report_when_a_fault_never_recovers_then_counted_and_verdict_fails(
        tmp_path: Path) -> None:
    report = build_report(_history(tmp_path / "h.jsonl", unrecovered=True), tmp_path / "out")
    row = next(r for r in report.rows if r.kind == "cut_off_site")
    assert row.unrecovered == 1 and row.recovery_s == []
    assert not report.verdict.passed and "recovery" in report.verdict.failed


def test_cli_report_when_history_given_then_files_written_and_exit_says_the_verdict(
        tmp_path: Path, capsys) -> None:
    from cluster.cli import main

    assert main(["report", str(_history(tmp_path / "ok.jsonl")), "--out",
                 str(tmp_path / "r1"), "--json"]) == 1  # the late recovery
    out = capsys.readouterr().out
    assert '"passed": false' in out and (tmp_path / "r1" / "report.html").exists()
    assert main(["report", str(tmp_path / "missing.jsonl")]) == 2
