"""Plain progress lines when stderr is not a terminal: one per N% with elapsed time and ETA,
one at the end; nothing when progress is off."""

import io

from medscalpel import progress
from medscalpel.progress import LiveStatus, PlainProgress, track


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_plain_lines_every_n_percent_with_eta():
    clock, out = _Clock(), io.StringIO()
    p = PlainProgress("predict", 200, every=25, stream=out, clock=clock)
    for _ in range(200):
        clock.t += 0.5
        p.advance()
    p.close()
    lines = out.getvalue().splitlines()
    assert lines == [
        "predict: 25% (50/200) 0:25 elapsed, ETA 1:15",
        "predict: 50% (100/200) 0:50 elapsed, ETA 0:50",
        "predict: 75% (150/200) 1:15 elapsed, ETA 0:25",
        "predict: 100% (200/200) 1:40 elapsed, ETA 0:00",
    ]


def test_track_and_livestatus_plain_when_not_a_tty(monkeypatch, capsys):
    monkeypatch.setenv("MEDSCALPEL_PROGRESS", "1")
    monkeypatch.setenv("MEDSCALPEL_PROGRESS_EVERY", "50")
    assert progress._mode() == "plain"  # pytest's captured stderr is not a terminal
    assert list(track(range(10), "images")) == list(range(10))
    with LiveStatus("epoch 1/3", 4) as bar:
        for k in range(4):
            bar.advance(info=f"loss {1.0 / (k + 1):.2f}")
    err = capsys.readouterr().err.splitlines()
    assert [ln.split(" ")[:3] for ln in err] == [["images:", "50%", "(5/10)"],
                                                 ["images:", "100%", "(10/10)"],
                                                 ["epoch", "1/3:", "50%"],
                                                 ["epoch", "1/3:", "100%"]]
    assert err[-1].endswith("loss 0.25") and "ETA" in err[-1]
    monkeypatch.setenv("MEDSCALPEL_PROGRESS", "0")
    assert list(track(range(3), "quiet")) == [0, 1, 2]
    assert capsys.readouterr().err == ""
