"""One job at a time (captioning or training) in a worker thread: start, watch, stop, final report.

The WebUI's tab and HTTP API share one `JobRunner`. A job is a function `work(job) -> JobResult` run in a
daemon thread; it reports progress through `job.update(...)` and polls `job.stop_mode`. Starting a second job
while one runs raises `JobBusyError` (HTTP 409). Finished jobs are kept (the last few) so their reports stay
readable after the run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional

logger = logging.getLogger(__name__)

KEEP_FINISHED = 20
STOP_MODES = ("save", "discard")


class JobBusyError(RuntimeError):
    """Another job is running; only one runs at a time."""


class JobNotFoundError(KeyError):
    """No job has this id."""


@dataclass
class JobStatus:
    id: str
    kind: str  # "caption" | "train"
    state: str = "running"  # running | done | stopped | failed
    step: int = 0
    total_steps: int = 0
    loss: Optional[float] = None
    eta_s: Optional[float] = None
    output: Optional[str] = None  # the file written (the LoRA, or the CSV/folder for captions)
    error: Optional[str] = None
    advice: Dict[str, Any] = field(default_factory=dict)  # settings that would fix a failure, {"section.key": value}
    message: str = ""  # one line for people: what is happening now
    report: Dict[str, Any] = field(default_factory=dict)
    losses: List[float] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    finished: Optional[float] = None


@dataclass
class JobResult:
    state: str = "done"  # done | stopped
    output: Optional[str] = None
    report: Dict[str, Any] = field(default_factory=dict)
    message: str = ""  # the job's last line for people ("600 steps in 12 min"); "" keeps the last progress line


class Job:
    """A running or finished job; thread-safe reads through snapshot()."""

    def __init__(self, kind: str):
        self.status = JobStatus(id=uuid.uuid4().hex[:12], kind=kind)
        self.stop_mode: Optional[str] = None
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._stop_listeners: List[Callable[[], None]] = []

    @property
    def id(self) -> str:
        return self.status.id

    def update(self, **fields: Any) -> None:
        with self._lock:
            for key, value in fields.items():
                setattr(self.status, key, value)

    def snapshot(self) -> Dict[str, Any]:
        """The status as plain JSON values (a non-finite number becomes None)."""
        with self._lock:
            return _finite(asdict(self.status))

    def request_stop(self, mode: str) -> None:
        if mode not in STOP_MODES:
            raise ValueError(f"mode must be one of {', '.join(STOP_MODES)}, not {mode!r}")
        if self.done.is_set():
            raise JobBusyError(f"job {self.id} has already ended ({self.status.state})")
        self.stop_mode = mode
        with self._lock:
            listeners = list(self._stop_listeners)
        for listener in listeners:
            listener()

    @contextlib.contextmanager
    def stop_listener(self, listener: Callable[[], None]) -> Iterator[None]:
        """Calls listener() (from the thread that asks) when a stop is requested during the block, so work that
        does not poll `stop_mode` (an image the WebUI is generating) can be cut short."""
        with self._lock:
            self._stop_listeners.append(listener)
        try:
            yield
        finally:
            with self._lock:
                self._stop_listeners.remove(listener)

    def _finish(self, result: Optional[JobResult], error: Optional[BaseException]) -> None:
        if error is not None:
            self.update(state="failed", error=_describe(error), message=f"failed: {_describe(error)}", eta_s=None,
                        advice=dict(getattr(error, "changes", None) or {}), finished=time.time(),
                        report=dict(getattr(error, "report", None) or {}))  # e.g. where the LoRA went instead
        else:
            final = {"message": result.message} if result.message else {}
            self.update(state=result.state, output=result.output, report=result.report, finished=time.time(),
                        eta_s=None, **final)
        self.done.set()


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def _describe(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text if isinstance(error, (ValueError, OSError, ImportError)) else f"{type(error).__name__}: {text}"


class JobRunner:
    """Runs at most one job at a time; remembers the last KEEP_FINISHED jobs."""

    def __init__(self):
        self._jobs: "OrderedDict[str, Job]" = OrderedDict()
        self._lock = threading.Lock()

    def current(self) -> Optional[Job]:
        with self._lock:
            return next((job for job in self._jobs.values() if not job.done.is_set()), None)

    def latest(self, kind: Optional[str] = None) -> Optional[Job]:
        with self._lock:
            jobs = [job for job in self._jobs.values() if kind is None or job.status.kind == kind]
        return jobs[-1] if jobs else None

    def get(self, job_id: str) -> Job:
        with self._lock:
            if job_id not in self._jobs:
                raise JobNotFoundError(job_id)
            return self._jobs[job_id]

    def check_free(self) -> None:
        """Raises JobBusyError while a job runs (so a request is answered "busy" before its own checks)."""
        with self._lock:
            self._check_free()

    def _check_free(self) -> None:
        running = next((job for job in self._jobs.values() if not job.done.is_set()), None)
        if running is not None:
            raise JobBusyError(f"a {running.status.kind} job ({running.id}) is running; stop it or wait "
                               "for it to finish")

    def start(self, kind: str, work: Callable[[Job], JobResult]) -> Job:
        """Starts work(job) in a thread; raises JobBusyError while another job runs."""
        with self._lock:
            self._check_free()
            job = Job(kind)
            self._jobs[job.id] = job
            while len(self._jobs) > KEEP_FINISHED:
                self._jobs.popitem(last=False)
        threading.Thread(target=self._run, args=(job, work), name=f"lora-train-{kind}", daemon=True).start()
        return job

    @staticmethod
    def _run(job: Job, work: Callable[[Job], JobResult]) -> None:
        try:
            result = work(job)
        except BaseException as error:  # the job reports every failure; the server thread must live on
            logger.exception("%s job %s failed", job.status.kind, job.id)
            job._finish(None, error)
        else:
            job._finish(result, None)
