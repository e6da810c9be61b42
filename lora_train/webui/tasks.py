"""The WebUI's two jobs, shared by the tab and the HTTP API: caption (or tag) a folder, train the checkpoint.

Each `*_job` function checks its request synchronously (so the caller can answer 422 at once: for training the
whole plan, config, dataset, buckets and output) and returns the work function that `JobRunner.start` runs in
its thread. Training lands the LoRA in the WebUI's Lora folder, checks it with the WebUI's own loader, refreshes
the Lora list and drops cached conditioning.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from ..caption_writer import FolderOptions, caption_folder
from ..captioning import CaptionOptions, create_captioner
from ..extras import EXTRAS, pip_command, request_install
from ..tagger import TaggerOptions, is_tagger_model
from ..config import ConfigError, TrainConfig, config_from_dict
from ..dataset import Dataset, DatasetError, load_dataset
from ..export import check_free
from ..jobs import Job, JobResult
from ..pipeline import train_lora
from ..save_plan import check_plan
from . import status_text
from .host import Host

Work = Callable[[Job], JobResult]


@dataclass
class PreviewOptions:
    every_n_steps: int = 0  # 0 = no previews
    prompt: str = ""  # empty: the first training caption
    seed: int = 1234  # one seed for every preview, so they compare
    steps: int = 20
    width: Optional[int] = None  # None: the training resolution
    height: Optional[int] = None


def prepare_train_config(values: Dict[str, Any], host: Host) -> TrainConfig:
    """The config for a WebUI run: the loaded checkpoint, the LoRA in the Lora folder, work files outside it.

    Raises:
        ConfigError: a bad key or value, a base_model (the WebUI trains what it has loaded), or a LoRA file of
            that name already in the Lora folder without output.overwrite.
    """
    config = config_from_dict(values)
    if config.model.base_model:
        raise ConfigError("model.base_model: the WebUI trains the checkpoint it has loaded; leave the key out "
                          "and pick the checkpoint at the top of the page")
    output = config.output
    output.validate()
    work = host.work_dir(output.output_name)
    config.output = dataclasses.replace(
        output, output_dir=str(host.lora_dir()), logging_dir=output.logging_dir or str(work / "logs"),
        checkpoint_dir=output.checkpoint_dir or str(work / "checkpoints"))
    config.validate(require_base_model=False)
    try:
        check_free(config.output.lora_path, config.output.overwrite)
    except FileExistsError as error:
        raise ConfigError(f"output.output_name: {error}") from None
    return config


def check_train_plan(config: TrainConfig) -> Dataset:
    """The dataset, its buckets and the output checked now, so that a bad plan is refused before a job exists.

    Raises:
        ConfigError, SavePlanError, RunLockedError, CheckpointError: what to fix, naming the setting.
    """
    try:
        dataset = load_dataset(config.data)
    except DatasetError as error:
        named = str(error) if str(error).startswith("data.") else f"data.train_data_dir: {error}"
        raise ConfigError(named) from None
    check_plan(config, dataset)
    return dataset


class HostProgress:
    """Trainer callback: job status, the WebUI's progress bar, stop requests from the job or Interrupt."""

    def __init__(self, job: Job, host: Host):
        self.job, self.host = job, host

    def __call__(self, event: str, trainer) -> None:
        info = trainer.info
        if event == "cache":
            self._say(0, info.total_steps, status_text.cache_line(info.cached, info.cache_total))
        elif event == "start":
            self._say(info.step, info.total_steps, f"starting: {info.total_steps} steps")
        elif event == "step":
            self.job.update(step=info.step, total_steps=info.total_steps, loss=info.loss, eta_s=info.eta_s,
                            losses=list(trainer.position.losses))
            self._say(info.step, info.total_steps,
                      status_text.step_line(info.step, info.total_steps, info.loss, info.seconds_per_step))
        if trainer.stop_mode is None and (self.job.stop_mode or self.host.interrupted()):
            trainer.request_stop(self.job.stop_mode or "save")

    def _say(self, step: int, total: int, text: str) -> None:
        self.job.update(message=text)
        self.host.report(step, total, text)


class Previews:
    """Trainer callback: an image from the WebUI's sampler at the start and every N steps, same seed.

    A stop requested while an image is being generated cuts the image short (the WebUI's Interrupt), so the
    job stops within a step; that half-made image is not kept.
    """

    def __init__(self, host: Host, options: PreviewOptions, folder: Path, job: Job):
        self.host, self.options, self.folder, self.job = host, options, folder, job
        self.paths: List[str] = []

    def __call__(self, event: str, trainer) -> None:
        every, step = self.options.every_n_steps, trainer.position.step
        if not every or not (event == "start" or (event == "step" and step % every == 0)):
            return
        if self.job.stop_mode is not None:
            return
        text = status_text.preview_line(step)
        self.job.update(message=text)
        self.host.report(step, trainer.total_steps, text)
        image = self._generate(trainer)
        if self.job.stop_mode is not None:  # asked during the image: stop before the next step
            trainer.request_stop(self.job.stop_mode)
            return
        if image is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"step-{step:06d}.png"
        image.save(path)
        self.paths.append(str(path))
        self.host.show_image(image)
        self.job.update(report={"previews": list(self.paths)})

    def _generate(self, trainer):
        size = trainer.config.data.resolution
        trainer.network.eval()
        try:
            with trainer.offloader.suspended(), self.job.stop_listener(self.host.stop_generation):
                if self.job.stop_mode is not None:  # asked just before the listener was there
                    return None
                return self.host.generate(self.options.prompt or trainer.dataset.samples[0].caption,
                                          self.options.seed, self.options.steps, self.options.width or size,
                                          self.options.height or size)
        finally:
            trainer.network.train()


def train_job(values: Dict[str, Any], host: Host, preview: Optional[PreviewOptions] = None,
              task_id: Optional[str] = None) -> Work:
    """Checks the request now; returns the work that trains and verifies."""
    config = prepare_train_config(values, host)
    host.check_trainable()
    dataset = check_train_plan(config)
    preview = preview or PreviewOptions()

    def work(job: Job) -> JobResult:
        previews = Previews(host, preview, config.output.log_dir.parent / "previews", job)
        with host.exclusive("lora_train", task_id):
            result = train_lora(config, host.training_model(), callbacks=[HostProgress(job, host), previews],
                                dataset=dataset)
            report = {"steps": result.steps, "total_steps": result.total_steps, "losses": result.losses,
                      "seconds": round(result.seconds, 1), "log_dir": str(result.log_dir),
                      "previews": previews.paths, "epoch_files": [str(p) for p in result.epoch_files],
                      "checkpoints": [str(p) for p in result.checkpoints], "discarded": result.lora_path is None,
                      "skipped_steps": result.skipped_steps}
            verification = host.after_save(result.lora_path) if result.lora_path is not None else None
            if verification is not None:
                report["verification"] = dataclasses.asdict(verification)
        if verification is not None and not verification.ok:
            raise RuntimeError(f"{result.lora_path} was saved, but the WebUI's Lora loader placed "
                               f"{verification.matched} of its {verification.stems} layers (could not place: "
                               f"{', '.join(verification.unmatched[:5])}); please report this")
        state = "done" if result.state == "done" else "stopped"
        return JobResult(state=state, output=str(result.lora_path) if result.lora_path else None, report=report,
                         message=status_text.train_end_line(result.state, result.steps, result.total_steps,
                                                            result.seconds))
    return work


@dataclass
class CaptionRequest:
    input: str
    model: str
    batch_size: int = 8
    prefix: str = ""
    suffix: str = ""
    mode: str = "skip"
    output: Optional[str] = None  # a metadata.csv path; None: .txt sidecars
    recursive: bool = False
    max_length: int = CaptionOptions.max_length  # BLIP/GIT only
    min_length: int = CaptionOptions.min_length
    num_beams: int = CaptionOptions.num_beams
    general_threshold: float = TaggerOptions.general_threshold  # WD14 tagger only
    character_threshold: float = TaggerOptions.character_threshold
    exclude_tags: List[str] = dataclasses.field(default_factory=list)
    underscores_to_spaces: bool = TaggerOptions.underscores_to_spaces
    rating_tags: bool = TaggerOptions.rating_tags


class MissingPackageError(ValueError):
    """The picked model needs a package the WebUI lacks; the message has the pip command."""


def _check_tagger_runtime(model: str) -> None:
    """For a tagger without onnxruntime: notes it for install.py's next run and says what to do."""
    module, _ = EXTRAS["tagger"]
    if not is_tagger_model(model) or importlib.util.find_spec(module) is not None:
        return
    request_install("tagger")
    raise MissingPackageError(f"model: the WD14 tagger needs {module}, which this WebUI lacks; restart the WebUI "
                              f"and it installs it at start-up, or run `{pip_command('tagger')}` in its venv")


def _create_captioner(request: CaptionRequest):
    _check_tagger_runtime(request.model)
    return create_captioner(request.model, CaptionOptions(
        batch_size=request.batch_size, max_length=request.max_length, min_length=request.min_length,
        num_beams=request.num_beams), TaggerOptions(
        general_threshold=request.general_threshold, character_threshold=request.character_threshold,
        exclude_tags=tuple(request.exclude_tags), underscores_to_spaces=request.underscores_to_spaces,
        rating_tags=request.rating_tags, batch_size=request.batch_size))


def caption_job(request: CaptionRequest, host: Host, task_id: Optional[str] = None) -> Work:
    """Checks the request now (folder, options, model); returns the work that captions or tags."""
    if not Path(request.input).is_dir():
        raise ConfigError(f"input: {request.input!r} is not a folder; give the folder that holds the images")
    folder_options = FolderOptions(recursive=request.recursive, write_txt=request.output is None,
                                   csv_path=Path(request.output) if request.output else None,
                                   prefix=request.prefix, suffix=request.suffix, mode=request.mode)
    folder_options.validate()
    captioner = _create_captioner(request)

    def work(job: Job) -> JobResult:
        def progress(done: int, total: int) -> None:
            job.update(step=done, total_steps=total, message=f"captioned {done}/{total}")
            host.report(done, total, f"captioning {done}/{total}")

        with host.exclusive("lora_train_caption", task_id):
            try:
                report = caption_folder(request.input, captioner, folder_options, progress=progress,
                                        stop=lambda: job.stop_mode is not None or host.interrupted())
            finally:
                captioner.unload()  # give the memory back to generation and training
        summary = {"captioned": report.captioned, "skipped": report.skipped, "seconds": round(report.seconds, 2),
                   "images_per_s": round(report.images_per_s, 2),
                   "failed": [[str(path), reason] for path, reason in report.failed], "summary": report.summary()}
        return JobResult(state="stopped" if report.stopped else "done",
                         output=request.output or request.input, report=summary)
    return work
