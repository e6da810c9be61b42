"""Stand-in for modules/progress.py: the task queue the page's progress bar follows (POST /internal/progress).

`progressapi(req)` answers as A1111's does, without the live-preview image encoding.
"""

from __future__ import annotations

import random
import string
import time
from collections import OrderedDict
from typing import List, Optional

from pydantic import BaseModel, Field

from modules import shared

current_task = None
pending_tasks = OrderedDict()
finished_tasks: List[str] = []
recorded_results = []
recorded_results_limit = 2


def start_task(id_task):
    global current_task

    current_task = id_task
    pending_tasks.pop(id_task, None)


def finish_task(id_task):
    global current_task

    if current_task == id_task:
        current_task = None
    finished_tasks.append(id_task)
    if len(finished_tasks) > 16:
        finished_tasks.pop(0)


def create_task_id(task_type):
    return f"task({task_type}-{''.join(random.choices(string.ascii_uppercase + string.digits, k=7))})"


def record_results(id_task, res):
    recorded_results.append((id_task, res))
    if len(recorded_results) > recorded_results_limit:
        recorded_results.pop(0)


def add_task_to_queue(id_job):
    pending_tasks[id_job] = time.time()


class ProgressRequest(BaseModel):
    id_task: Optional[str] = Field(default=None)
    id_live_preview: int = Field(default=-1)
    live_preview: bool = Field(default=True)


class ProgressResponse(BaseModel):
    active: bool
    queued: bool
    completed: bool
    progress: Optional[float] = None
    eta: Optional[float] = None
    live_preview: Optional[str] = None
    id_live_preview: Optional[int] = None
    textinfo: Optional[str] = None


def progressapi(req: ProgressRequest) -> ProgressResponse:
    active = req.id_task == current_task
    queued = req.id_task in pending_tasks
    completed = req.id_task in finished_tasks
    if not active:
        return ProgressResponse(active=False, queued=queued, completed=completed, id_live_preview=-1,
                                textinfo="In queue" if queued else "Waiting...")
    state = shared.state
    progress = 0.0
    if state.job_count > 0:
        progress += state.job_no / state.job_count
    if state.sampling_steps > 0 and state.job_count > 0:
        progress += 1 / state.job_count * state.sampling_step / state.sampling_steps
    progress = min(progress, 1)
    elapsed = time.time() - state.time_start
    eta = elapsed / progress - elapsed if progress > 0 else None
    return ProgressResponse(active=True, queued=queued, completed=completed, progress=progress, eta=eta,
                            id_live_preview=state.id_live_preview, textinfo=state.textinfo)
