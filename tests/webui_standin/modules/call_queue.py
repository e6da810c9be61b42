"""Stand-in for modules/call_queue.py: the queue lock every GPU call of the WebUI holds."""

from functools import wraps

from modules import fifo_lock, shared

queue_lock = fifo_lock.FIFOLock()


def wrap_queued_call(func):
    def f(*args, **kwargs):
        with queue_lock:
            return func(*args, **kwargs)

    return f


def wrap_gradio_gpu_call(func, extra_outputs=None):
    """Holds queue_lock and brackets the call with shared.state.begin/end (A1111 also tracks the task id)."""

    @wraps(func)
    def f(*args, **kwargs):
        task = args[0] if args and isinstance(args[0], str) and args[0].startswith("task(") else None
        with queue_lock:
            shared.state.begin(job=task)
            try:
                return func(*args, **kwargs)
            finally:
                shared.state.end()

    return f
