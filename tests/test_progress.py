"""The driver's progress line: counts, rate and ETA, at most one line per interval, none for the last item."""

from __future__ import annotations

from pipeline import progress
from pipeline.progress import Progress, eta_text


def test_progress_lines(monkeypatch, capsys):
    clock = iter([100.0, 102.0, 103.0, 104.0, 106.0])  # start, then one reading per add
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(progress, "INTERVAL_S", 2.0)
    p = Progress("[score-ref] train", total=1000, unit="pairs")
    p.add(100)  # t = 102: 2 s since the start -> a line: 100 in 2 s = 50/s, 900 left -> 18 s
    p.add(100)  # t = 103: 1 s since the last line -> none
    p.add(300)  # t = 104: 2 s -> a line: 500 in 4 s = 125/s, 500 left -> 4 s
    p.add(500)  # t = 106: done -> none (the stage's summary says it)
    assert capsys.readouterr().out.splitlines() == [
        "[score-ref] train: 100/1,000 pairs (10%), 50.0 pairs/s, ETA 0m18s",
        "[score-ref] train: 500/1,000 pairs (50%), 125.0 pairs/s, ETA 0m04s",
    ]


def test_eta_text():
    assert eta_text(247.9) == "4m07s" and eta_text(float("inf")) == "?" and eta_text(float("nan")) == "?"


def test_a_count_without_total(monkeypatch, capsys):
    clock = iter([0.0, 5.0, 10.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(progress, "INTERVAL_S", 10.0)
    p = Progress("[tokenize] actor 7", total=None, unit="rows")
    p.add(256)  # t = 5: too soon
    p.add(256)  # t = 10: 512 rows in 10 s
    assert capsys.readouterr().out == "[tokenize] actor 7: 512 rows, 51.2 rows/s\n"
