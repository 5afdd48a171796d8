"""The runtime's readers-writer lock: exclusion, FIFO fairness, and no leak on errors."""

import threading
import time

import pytest

from edgemerge.runtime.session import RWLock


def test_writer_excludes_readers_and_readers_share():
    lock, inside, peak = RWLock(), [0], [0]
    guard = threading.Lock()

    def reader():
        with lock.read():
            with guard:
                inside[0] += 1
                peak[0] = max(peak[0], inside[0])
            time.sleep(0.05)
            with guard:
                inside[0] -= 1

    ts = [threading.Thread(target=reader) for _ in range(4)]
    for t in ts:
        t.start()
    time.sleep(0.01)
    with lock.write():
        assert inside[0] == 0  # every reader left before the writer entered
    for t in ts:
        t.join()
    assert peak[0] >= 2  # readers overlapped


def test_nonstop_writer_cannot_starve_readers():
    lock, stop, reads = RWLock(), threading.Event(), [0]

    def writer():
        while not stop.is_set():
            with lock.write():
                pass

    w = threading.Thread(target=writer)
    w.start()
    t0 = time.perf_counter()
    for _ in range(200):
        with lock.read():
            reads[0] += 1
    stop.set()
    w.join()
    assert reads[0] == 200 and time.perf_counter() - t0 < 10


def test_failed_downgrade_releases_everything():
    lock = RWLock()
    with pytest.raises(RuntimeError):
        with lock.write(downgrade=True):
            raise RuntimeError("switch failed")
    done = threading.Event()
    threading.Thread(target=lambda: (lock.write().__enter__(), done.set())).start()
    assert done.wait(2), "a writer could not enter: the failed downgrade leaked a reader"
