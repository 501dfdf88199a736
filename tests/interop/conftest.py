"""Print the measured NeMo-vs-ours logit differences at the end of the run (without `-s` too)."""

from __future__ import annotations


def pytest_terminal_summary(terminalreporter) -> None:
    rows = [
        (report.nodeid.rsplit("[", 1)[-1].rstrip("]"), value)
        for outcome in ("passed", "failed")
        for report in terminalreporter.stats.get(outcome, [])
        for name, value in getattr(report, "user_properties", [])
        if name == "max_abs_logit_diff"
    ]
    if rows:
        terminalreporter.section("real NeMo 2.5.0 vs nemo_aligner: max |logit diff| per kind of .nemo")
        for kind, value in rows:
            terminalreporter.line(f"{kind:20s} {value:.3g}")
