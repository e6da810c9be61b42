"""The one line a job shows for what is happening now, in the tab's status and on the WebUI's progress bar.

One ETA (from the measured seconds per step, which leaves the caching out), durations people read ("10 min",
not "612 s"), and a final line that keeps no progress figures once the run has ended.
"""

from __future__ import annotations

from typing import Optional


def duration(seconds: float) -> str:
    """"45 s", "10 min", "1 h 5 min": rounded to what matters at that length."""
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60} min" if minutes % 60 else f"{minutes // 60} h"


def speed(seconds_per_step: float) -> str:
    """"1.3 s/step" for slow steps, "4.2 steps/s" for fast ones."""
    if seconds_per_step >= 1 or seconds_per_step <= 0:
        return f"{seconds_per_step:.1f} s/step"
    return f"{1 / seconds_per_step:.1f} steps/s"


def step_line(step: int, total: int, loss: Optional[float], seconds_per_step: float) -> str:
    """"step 120/600, loss 0.1234, 1.3 s/step, ETA 10 min"."""
    loss_text = f", loss {loss:.4f}" if loss is not None else ""
    eta = (total - step) * seconds_per_step
    return f"step {step}/{total}{loss_text}, {speed(seconds_per_step)}, ETA {duration(eta)}"


def cache_line(done: int, total: int) -> str:
    return f"caching latents {done}/{total}"


def preview_line(step: int) -> str:
    return f"generating preview at step {step}"


def train_end_line(state: str, steps: int, total: int, seconds: float) -> str:
    """What a finished run did: "600 steps in 12 min (1.2 s/step)", or where it was stopped and what was kept."""
    took = f"in {duration(seconds)}" + (f" ({speed(seconds / steps)})" if steps else "")
    if state == "done":
        return f"{steps} steps {took}"
    kept = "the LoRA was discarded" if state == "discarded" else "the LoRA was saved"
    return f"stopped at step {steps}/{total} {took}; {kept}"
