"""Stand-in for modules/shared_state.py: the progress state the page polls (POST /internal/progress)."""

import datetime
import logging
import time

from modules import shared

log = logging.getLogger(__name__)


class State:
    skipped = False
    interrupted = False
    stopping_generation = False
    job = ""
    job_no = 0
    job_count = 0
    processing_has_refined_job_count = False
    job_timestamp = '0'
    sampling_step = 0
    sampling_steps = 0
    current_latent = None
    current_image = None
    current_image_sampling_step = 0
    id_live_preview = 0
    textinfo = None
    time_start = None
    server_start = None

    def __init__(self):
        self.server_start = time.time()

    def skip(self):
        self.skipped = True

    def interrupt(self):
        """What the page's Interrupt button does."""
        self.interrupted = True
        log.info("Received interrupt request")

    def stop_generating(self):
        self.stopping_generation = True

    def nextjob(self):
        self.job_no += 1
        self.sampling_step = 0
        self.current_image_sampling_step = 0

    def dict(self):
        return {"skipped": self.skipped, "interrupted": self.interrupted,
                "stopping_generation": self.stopping_generation, "job": self.job, "job_count": self.job_count,
                "job_timestamp": self.job_timestamp, "job_no": self.job_no, "sampling_step": self.sampling_step,
                "sampling_steps": self.sampling_steps}

    def begin(self, job: str = "(unknown)"):
        """Resets progress and the interrupt flags for a new job."""
        self.sampling_step = 0
        self.time_start = time.time()
        self.job_count = -1
        self.processing_has_refined_job_count = False
        self.job_no = 0
        self.job_timestamp = datetime.datetime.now().strftime("%Y%m%d%H%M%S")
        self.current_latent = None
        self.current_image = None
        self.current_image_sampling_step = 0
        self.id_live_preview = 0
        self.skipped = False
        self.interrupted = False
        self.stopping_generation = False
        self.textinfo = None
        self.job = job
        log.info("Starting job %s", job)

    def end(self):
        log.info("Ending job %s (%.2f seconds)", self.job, time.time() - self.time_start)
        self.job = ""
        self.job_count = 0

    def assign_current_image(self, image):
        """The live preview shown under the progress bar."""
        if shared.opts.live_previews_image_format == 'jpeg' and image.mode in ('RGBA', 'P'):
            image = image.convert('RGB')
        self.current_image = image
        self.id_live_preview += 1
