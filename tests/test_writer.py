"""The background output writer (issue 18): ordered, bounded, drained, errors surface."""

from __future__ import annotations

import threading

import pytest

from pacs_numba.runs.writer import OutputWriter


def test_jobs_run_in_order_and_close_drains():
    done = []
    with OutputWriter(depth=2) as w:
        for i in range(5):
            w.submit(lambda i=i: done.append(i))
    assert done == [0, 1, 2, 3, 4]


def test_a_full_queue_blocks_the_submitter():
    gate = threading.Event()
    started = threading.Event()
    w = OutputWriter(depth=1)

    def slow():
        started.set()
        gate.wait(10)

    w.submit(slow)
    started.wait(10)
    w.submit(lambda: None)  # waits in the queue (depth 1)
    third = threading.Thread(target=w.submit, args=(lambda: None,))
    third.start()
    third.join(0.2)
    assert third.is_alive()  # blocked: the memory bound holds
    gate.set()
    third.join(10)
    assert not third.is_alive()
    w.close()


def test_a_failed_job_stops_the_writer_and_surfaces():
    done = []

    def boom():
        raise OSError("disk full")

    w = OutputWriter()
    w.submit(boom)
    with pytest.raises(OSError, match="disk full"):
        w.close()
    assert done == []
    with pytest.raises(RuntimeError, match="the output writer is closed"):
        w.submit(lambda: None)


def test_leaving_on_an_error_drains_and_keeps_that_error():
    done = []
    with pytest.raises(KeyError), OutputWriter() as w:
        w.submit(lambda: done.append("written"))
        raise KeyError("stop")
    assert done == ["written"]


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="depth must be >= 1"):
        OutputWriter(depth=0)
