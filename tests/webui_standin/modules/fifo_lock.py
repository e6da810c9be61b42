"""Stand-in for modules/fifo_lock.py: a non-reentrant lock that wakes its waiters first come, first served."""

import collections
import threading


class FIFOLock:
    def __init__(self):
        self._lock = threading.Lock()
        self._inner_lock = threading.Lock()
        self._waiting = collections.deque()

    def acquire(self, blocking=True):
        with self._inner_lock:
            if self._lock.acquire(False):
                return True
            if not blocking:
                return False
            turn = threading.Event()
            self._waiting.append(turn)
        turn.wait()
        return self._lock.acquire()

    def release(self):
        with self._inner_lock:
            if self._waiting:
                self._waiting.popleft().set()
            self._lock.release()

    __enter__ = acquire

    def __exit__(self, *exc_info):
        self.release()
