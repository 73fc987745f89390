"""Log set-up: the lean record and the once-a-second time stamp must print what stock logging
prints, and rate-limited lines must say how many were suppressed."""

import io
import logging
import os
import time

import pytest

from portfwd.runtime import logs


@pytest.fixture
def captured(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    factory = logging.getLogRecordFactory()
    logs.setup_logging("tcpfwd", detached=False)
    yield stream
    logging.setLogRecordFactory(factory)
    logging.getLogger().handlers.clear()


def stock_line(fmt: str, record: logging.LogRecord) -> str:
    return logging.Formatter(fmt).format(record)


def test_foreground_line_matches_stock_logging(captured):
    logging.getLogger("portfwd.tcp").info("conn %d open %s -> %s", 7, "127.0.0.1:5", "[::1]:80")
    line = captured.getvalue()
    assert line.endswith(f" tcpfwd[{os.getpid()}] INFO: conn 7 open 127.0.0.1:5 -> [::1]:80\n")
    stamp = line.split(" tcpfwd[")[0]
    parsed = time.strptime(stamp.split(",")[0], "%Y-%m-%d %H:%M:%S")
    assert abs(time.mktime(parsed) - time.time()) < 5
    assert len(stamp.split(",")[1]) == 3  # milliseconds, zero-padded


def test_lean_record_formats_like_a_stock_record():
    fmt = "%(asctime)s %(name)s[%(process)d] %(levelname)s: %(message)s"
    logs.LeanRecord.pid = os.getpid()
    args = ("portfwd.tcp", logging.WARNING, "x.py", 3, "a %s b %d", ("s", 4), None)
    lean, stock = logs.LeanRecord(*args), logging.LogRecord(*args)
    lean.created, lean.msecs = stock.created, stock.msecs
    assert logs.Formatter(fmt).format(lean) == stock_line(fmt, stock)
    mapping = logs.LeanRecord("n", logging.INFO, "x.py", 1, "%(a)s", ({"a": 1},), None)
    assert mapping.getMessage() == "1"


def test_time_stamp_changes_with_the_second():
    formatter = logs.Formatter("%(asctime)s")
    record = logs.LeanRecord("n", logging.INFO, "", 0, "m", (), None)
    record.created, record.msecs = 1_000_000_000.25, 250.0
    first = formatter.formatTime(record)
    record.created, record.msecs = 1_000_000_001.5, 500.0
    second = formatter.formatTime(record)
    assert first.endswith(",250") and second.endswith(",500") and first[:-4] != second[:-4]
    assert formatter.formatTime(record, "%Y") == time.strftime("%Y", time.localtime(record.created))


def test_exception_lines_keep_the_traceback(captured):
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("portfwd").exception("failed")
    assert "ERROR: failed\nTraceback" in captured.getvalue()
    assert "ValueError: boom" in captured.getvalue()


def test_rate_limited_log_counts_suppressed_lines(captured, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: clock[0])
    limited = logs.RateLimitedLog(logging.getLogger("portfwd.t"), interval=10)
    for _ in range(5):
        limited.warning("k", "refused %s", "x")
    clock[0] += 11
    limited.warning("k", "refused %s", "y")
    lines = captured.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("refused x") and lines[1].endswith("refused y (4 similar suppressed)")


@pytest.mark.parametrize("level", [logging.INFO, logging.DEBUG])
def test_hot_log_writes_what_logger_log_writes(captured, level):
    logger = logging.getLogger("portfwd.tcp")
    logging.getLogger().setLevel(logging.DEBUG)
    logger.log(level, "conn %d closed: %d bytes up", 3, 10)
    logs.hot_log(logger, level, "conn %d closed: %d bytes up", 3, 10)
    first, second = captured.getvalue().splitlines()
    assert first.split(" ", 2)[2] == second.split(" ", 2)[2]  # all but the time stamp
    assert second.endswith(f"{logging.getLevelName(level)}: conn 3 closed: 10 bytes up")


def test_hot_log_honours_levels_and_propagation(captured):
    logger = logging.getLogger("portfwd.hot")
    logging.getLogger().setLevel(logging.WARNING)  # PORTFWD_LOGLEVEL=30
    logs.hot_log(logger, logging.INFO, "quiet")
    logging.getLogger().setLevel(logging.INFO)
    logs.hot_log(logger, logging.DEBUG, "below the level")
    logging.getLogger().handlers[0].setLevel(logging.ERROR)
    logs.hot_log(logger, logging.INFO, "filtered by the handler")
    logging.getLogger().handlers[0].setLevel(logging.NOTSET)
    own = io.StringIO()
    handler = logging.StreamHandler(own)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logs.hot_log(logger, logging.INFO, "only on the logger's own handler")
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    assert captured.getvalue() == ""
    assert own.getvalue() == "only on the logger's own handler\n"
