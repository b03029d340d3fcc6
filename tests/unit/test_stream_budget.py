"""A streamed build's builder output is bounded while the client reads slowly."""

from __future__ import annotations

from stages.grpc import build_service
from stages.service.events import LogLine, StageChanged


def test_lines_beyond_the_budget_are_dropped_and_announced(monkeypatch) -> None:
    monkeypatch.setattr(build_service, "STREAM_LOG_BUDGET", 10 * (10 + 128))
    out: list = []
    emit = build_service._BoundedLogs(out.append)
    for i in range(20):                      # 20 lines of 10 bytes: only 10 fit
        emit(LogLine(stream="stdout", data=b"%09d\n" % i))
    emit(StageChanged(name="run", state="finished"))   # never dropped, and announces
    assert [e.data for e in out[:10]] == [b"%09d\n" % i for i in range(10)]
    assert out[10].stream == "stderr" and b"10 lines" in out[10].data
    assert isinstance(out[11], StageChanged) and len(out) == 12
    for event in out:                        # the client catches up
        emit.sent(event)
    assert emit.waiting == 0
    emit(LogLine(stream="stdout", data=b"later\n"))
    assert out[12].data == b"later\n"
