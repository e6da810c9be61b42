"""Auto-captioning: BLIP or GIT writes a caption for every image of a training folder.

`create_captioner(model, options)` reads the model's config and returns the captioner for its `model_type`
("blip" or "git"); a hub id or a local folder (loaded with no network) both work. The weights load once, on
first use or `load()`, and `unload()` frees them (the next caption call loads them again).

`caption_folder(folder, captioner, options)` captions the images in batches and writes `.txt` sidecars and/or
a `metadata.csv` (filename,prompt) atomically. By default an image that already has a caption is skipped, so a
caption the user wrote or edited is never clobbered. Unreadable images are reported in `CaptionReport`, never
fatal; bad options raise `CaptionError` with the fix. Images are opened with `lora_train.images` and caption
files read and written with `lora_train.captions_io`, as training reads them; an existing CSV is only rewritten
when it has exactly the two columns filename,prompt, so that no column is ever dropped.
"""

from __future__ import annotations

import abc
import gc
import os
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from PIL import Image

from lora_train.captions_io import (CAPTION_COLUMNS, CSV_HEADER, FILENAME_COLUMNS, CaptionFileError,
                                    captions_from_table, read_csv_table, read_sidecar, write_caption_csv,
                                    write_text_atomic)
from lora_train.images import find_images, probe_image, to_rgb

DEFAULT_MODEL = "Salesforce/blip-image-captioning-large"
MODES = ("skip", "overwrite", "append")
DTYPES = ("auto", "fp16", "bf16", "fp32")
SIDECAR_EXTENSION = ".txt"

ProgressCallback = Callable[[int, int], None]
StopFlag = Union[Callable[[], bool], threading.Event]


class CaptionError(ValueError):
    """A model, folder or option the user must fix; the message says how."""


@dataclass
class CaptionOptions:
    max_length: int = 75  # generated tokens at most (BLIP and GIT count the prompt too)
    min_length: int = 5  # generated tokens at least
    num_beams: int = 3  # beam search width; 1 is greedy decoding
    prompt: Optional[str] = None  # conditional text, e.g. "a photo of"; GIT's output has it stripped
    batch_size: int = 8  # images per generate call
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda" or "cuda:N"
    dtype: str = "auto"  # "auto" (fp16 on CUDA, fp32 on CPU), "fp16", "bf16" or "fp32"

    def validate(self) -> None:
        for name, low in (("max_length", 1), ("min_length", 0), ("num_beams", 1), ("batch_size", 1)):
            if getattr(self, name) < low:
                raise CaptionError(f"{name} is {getattr(self, name)}; use a value >= {low}")
        if self.min_length > self.max_length:
            raise CaptionError(f"min_length {self.min_length} exceeds max_length {self.max_length}; lower it")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise CaptionError(f"device {self.device!r} is unknown; use auto, cpu, cuda or cuda:N")
        if self.dtype not in DTYPES:
            raise CaptionError(f"dtype {self.dtype!r} is unknown; use one of {', '.join(DTYPES)}")


def require_torch_transformers() -> Tuple[Any, Any]:
    """The torch and transformers modules, or ImportError with the pip command that installs them."""
    try:
        import torch
        import transformers
    except ImportError as error:
        raise ImportError(f"auto-captioning needs torch and transformers ({error}); "
                          "install them with: pip install torch transformers==4.30.2") from error
    return torch, transformers


def _from_pretrained(cls: Any, source: str, **kwargs: Any) -> Any:
    with warnings.catch_warnings():  # transformers 4.30 passes resume_download, which huggingface_hub deprecates
        warnings.filterwarnings("ignore", message=".*resume_download.*", category=FutureWarning)
        return cls.from_pretrained(source, **kwargs)


def _model_source(model: str) -> Tuple[str, bool]:
    """(what from_pretrained gets, whether it is a local folder loaded with local_files_only)."""
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise CaptionError(f"model folder {model!r} has no config.json; point it at a folder saved with "
                               "save_pretrained (a BLIP or GIT captioning model)")
        return str(path), True
    if model.startswith((".", "/", "~")) or "\\" in model or model.count("/") > 1:
        raise CaptionError(f"model folder {model!r} does not exist; fix the path or give a hub id "
                           f"such as {DEFAULT_MODEL}")
    return model, False


class Captioner(abc.ABC):
    """One captioning model; subclasses load a family's weights and turn a batch of images into captions."""

    family = ""
    model_class = ""  # the transformers classes that load the family's weights and processor
    processor_class = ""

    def __init__(self, source: str, local: bool, options: CaptionOptions) -> None:
        options.validate()
        self.source, self.local, self.options = source, local, options
        self.model: Any = None
        self.processor: Any = None

    @property
    def loaded(self) -> bool:
        return self.model is not None

    def load(self) -> None:
        """Loads the weights onto the chosen device, once."""
        if self.loaded:
            return
        torch, transformers = require_torch_transformers()
        device = self.device()
        dtype = _torch_dtype(torch, self.options.dtype, device)
        self.processor = _from_pretrained(getattr(transformers, self.processor_class), self.source,
                                          local_files_only=self.local)
        model = _from_pretrained(getattr(transformers, self.model_class), self.source, torch_dtype=dtype,
                                 local_files_only=self.local)
        self.model = model.to(device).eval()

    def unload(self) -> None:
        """Drops the weights and frees their memory (and the CUDA cache) so that training can use it."""
        self.model = None
        self.processor = None
        gc.collect()
        torch, _ = require_torch_transformers()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def device(self) -> str:
        torch, _ = require_torch_transformers()
        if self.options.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.options.device.startswith("cuda") and not torch.cuda.is_available():
            raise CaptionError(f"device {self.options.device!r} asked for, but torch sees no CUDA GPU; "
                               "use device cpu or auto")
        return self.options.device

    def caption(self, images: Sequence[Image.Image], batch_size: Optional[int] = None) -> List[str]:
        """One caption per RGB image, generated `batch_size` (default options.batch_size) images at a time."""
        self.load()
        torch, _ = require_torch_transformers()
        size = batch_size or self.options.batch_size
        captions: List[str] = []
        with torch.inference_mode():
            for start in range(0, len(images), size):
                captions.extend(" ".join(text.split()) for text in self._generate(list(images[start:start + size])))
        return captions

    def _generation_kwargs(self) -> Dict[str, int]:
        return {"max_length": self.options.max_length, "min_length": self.options.min_length,
                "num_beams": self.options.num_beams}

    def _inputs(self, images: List[Image.Image], **text: Any) -> Dict[str, Any]:
        """The processor's tensors on the model's device; pixel values in the model's dtype."""
        inputs = self.processor(images=images, return_tensors="pt", **text)
        device, dtype = self.model.device, self.model.dtype
        return {key: value.to(device, dtype) if value.is_floating_point() else value.to(device)
                for key, value in inputs.items()}

    @abc.abstractmethod
    def _generate(self, images: List[Image.Image]) -> List[str]:
        """Decoded captions for one batch of images."""


class BlipCaptioner(Captioner):
    """BLIP (Salesforce/blip-image-captioning-large or -base); a prompt starts the caption and stays in it."""

    family, model_class, processor_class = "blip", "BlipForConditionalGeneration", "BlipProcessor"

    def _generate(self, images: List[Image.Image]) -> List[str]:
        prompt = self.options.prompt
        inputs = self._inputs(images, text=[prompt] * len(images)) if prompt else self._inputs(images)
        output = self.model.generate(**inputs, **self._generation_kwargs())
        return self.processor.batch_decode(output, skip_special_tokens=True)


class GitCaptioner(Captioner):
    """GIT (microsoft/git-base family); a prompt is fed as the first tokens and stripped from the caption."""

    family, model_class, processor_class = "git", "AutoModelForCausalLM", "AutoProcessor"

    def _generate(self, images: List[Image.Image]) -> List[str]:
        torch, _ = require_torch_transformers()
        pixel_values = self._inputs(images)["pixel_values"]
        kwargs: Dict[str, Any] = self._generation_kwargs()
        prompt_length = 0
        if self.options.prompt:
            tokenizer = self.processor.tokenizer
            ids = [self.model.config.bos_token_id] + tokenizer(self.options.prompt, add_special_tokens=False).input_ids
            kwargs["input_ids"] = torch.tensor([ids] * len(images), device=self.model.device)
            prompt_length = len(ids)
        output = self.model.generate(pixel_values=pixel_values, **kwargs)
        return self.processor.batch_decode(output[:, prompt_length:], skip_special_tokens=True)


FAMILIES = {"blip": BlipCaptioner, "git": GitCaptioner}


def _torch_dtype(torch: Any, dtype: str, device: str) -> Any:
    on_cuda = device.startswith("cuda")
    if dtype in ("fp16", "bf16") and not on_cuda:
        raise CaptionError(f"dtype {dtype} needs a CUDA device (got {device}); use dtype fp32 or auto on CPU")
    names = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    return names[dtype] if dtype != "auto" else (torch.float16 if on_cuda else torch.float32)


def create_captioner(model: str = DEFAULT_MODEL, options: Optional[CaptionOptions] = None) -> Captioner:
    """The captioner for the model's config `model_type`; the weights load on first use (or `load()`)."""
    _, transformers = require_torch_transformers()
    source, local = _model_source(model)
    try:
        model_type = _from_pretrained(transformers.AutoConfig, source, local_files_only=local).model_type
    except OSError as error:  # not downloaded and no hub, or no such repository
        raise CaptionError(f"caption model {model!r} cannot be loaded ({str(error).splitlines()[0]}); give a "
                           "local model folder, or a hub id that is downloaded already") from None
    if model_type not in FAMILIES:
        raise CaptionError(f"{model!r} is a {model_type!r} model, not a captioning model; use a BLIP "
                           f"({DEFAULT_MODEL}) or GIT (microsoft/git-base) model")
    return FAMILIES[model_type](source, local, options or CaptionOptions())


@dataclass
class FolderOptions:
    recursive: bool = False  # also caption images in subfolders (hidden folders are never entered)
    write_txt: bool = True  # write <image stem>.txt sidecars
    csv_path: Optional[Path] = None  # also/instead write this metadata.csv (filenames relative to its folder)
    prefix: str = ""  # put before each generated caption as is, e.g. "sks style, "
    suffix: str = ""  # put after each generated caption as is
    mode: str = "skip"  # skip: keep existing captions; overwrite: replace them; append: existing + ", " + new

    def validate(self) -> None:
        if self.mode not in MODES:
            raise CaptionError(f"mode {self.mode!r} is unknown; use one of {', '.join(MODES)}")
        if not self.write_txt and self.csv_path is None:
            raise CaptionError("nothing to write: enable .txt sidecars or give a metadata.csv path")
        if self.csv_path is not None and not Path(self.csv_path).parent.is_dir():
            raise CaptionError(f"the folder of {str(self.csv_path)!r} does not exist; create it or fix the path")


@dataclass
class CaptionReport:
    captioned: int = 0
    skipped: int = 0  # images that already had a caption (mode skip)
    failed: List[Tuple[Path, str]] = field(default_factory=list)  # (image, why it got no caption)
    seconds: float = 0.0  # captioning time, model loading excluded
    images_per_s: float = 0.0
    stopped: bool = False  # the stop flag ended the run early

    def summary(self) -> str:
        lines = [f"captioned {self.captioned}, skipped {self.skipped} (already captioned), failed "
                 f"{len(self.failed)} in {self.seconds:.1f} s ({self.images_per_s:.2f} images/s)"
                 + ("; stopped early" if self.stopped else "")]
        lines += [f"  failed: {path}: {reason}" for path, reason in self.failed]
        return "\n".join(lines)


def read_caption_csv(path: Path) -> Dict[str, str]:
    """{filename relative to the CSV's folder, / form: caption} in file order; {} when there is no file yet.

    Raises:
        CaptionError: the file is not UTF-8 CSV, or its header is not exactly two columns, filename then caption
            (it is rewritten as filename,prompt, so any other column would be lost).
    """
    if not path.is_file():
        return {}
    try:
        header, rows = read_csv_table(path)
    except CaptionFileError as error:
        raise CaptionError(str(error)) from None
    if not header and not rows:
        return {}
    if len(header) != 2 or header[0] not in FILENAME_COLUMNS or header[1] not in CAPTION_COLUMNS:
        raise CaptionError(f"{path} has the header {','.join(header)!r}; captions are written to a two-column "
                           f"{','.join(CSV_HEADER)} CSV: fix the header or write another CSV")
    return captions_from_table(path, header, rows)


def _csv_key(image: Path, csv_path: Path) -> str:
    """The image's filename as the CSV holds it: relative to the CSV's folder, with / separators."""
    return Path(os.path.relpath(image, csv_path.parent)).as_posix()


@dataclass
class _Run:
    """One caption_folder call: what it writes and what it found so far."""

    captioner: Captioner
    options: FolderOptions
    csv_rows: Optional[Dict[str, str]]  # the CSV's captions when writing one, read before the run
    report: CaptionReport = field(default_factory=CaptionReport)

    def existing(self, image: Path) -> str:
        """The image's caption: its sidecar, else its CSV row (when writing the CSV); "" when it has none.

        Raises:
            CaptionFileError: the sidecar cannot be read.
        """
        caption = read_sidecar(image.with_suffix(SIDECAR_EXTENSION))
        if not caption and self.csv_rows is not None:
            caption = self.csv_rows.get(_csv_key(image, Path(self.options.csv_path)), "")
        return caption

    def write(self, image: Path, caption: str) -> None:
        if self.options.write_txt:
            write_text_atomic(image.with_suffix(SIDECAR_EXTENSION), caption)
        if self.csv_rows is not None:
            self.csv_rows[_csv_key(image, Path(self.options.csv_path))] = caption
        self.report.captioned += 1


def _plan(run: _Run, images: List[Path]) -> List[Tuple[Path, str]]:
    """(image, caption to append to) for the images to caption now; the others are skipped or failed."""
    claimed: Dict[Path, Path] = {}
    jobs = []
    for image in images:
        sidecar = image.with_suffix(SIDECAR_EXTENSION)
        if run.options.write_txt and sidecar in claimed:
            run.report.failed.append((image, f"shares {sidecar.name} with {claimed[sidecar].name}; rename one"))
            continue
        claimed[sidecar] = image
        try:
            existing = run.existing(image)
        except CaptionFileError as error:
            run.report.failed.append((image, f"{sidecar.name}: {error}"))
            continue
        if existing and run.options.mode == "skip":
            run.report.skipped += 1
        else:
            jobs.append((image, existing if run.options.mode == "append" else ""))
    return jobs


def _stop_requested(stop: Optional[StopFlag]) -> bool:
    if stop is None:
        return False
    return stop.is_set() if isinstance(stop, threading.Event) else bool(stop())


def _caption_batch(run: _Run, jobs: List[Tuple[Path, str]]) -> None:
    opened = []
    for path, existing in jobs:
        image, reason = probe_image(path)
        if image is None:
            run.report.failed.append((path, reason))
        else:
            opened.append((path, existing, to_rgb(image)))
    generated = run.captioner.caption([image for _, _, image in opened]) if opened else []
    for (path, existing, _), text in zip(opened, generated):
        if not text:
            run.report.failed.append((path, "the model generated an empty caption"))
            continue
        caption = run.options.prefix + text + run.options.suffix
        run.write(path, f"{existing}, {caption}" if existing else caption)


def caption_folder(folder: Union[str, Path], captioner: Captioner, options: Optional[FolderOptions] = None,
                   progress: Optional[ProgressCallback] = None, stop: Optional[StopFlag] = None) -> CaptionReport:
    """Captions the folder's images in batches of captioner.options.batch_size and writes the captions.

    `progress(done, total)` is called before the first batch and after each one (total: images to caption);
    `stop` (a callable or threading.Event) is checked before each batch. Captions done so far are always kept.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CaptionError(f"{str(folder)!r} is not a folder; give the folder that holds the images")
    options = options or FolderOptions()
    options.validate()
    csv_path = Path(options.csv_path) if options.csv_path is not None else None
    run = _Run(captioner, options, read_caption_csv(csv_path) if csv_path else None)
    jobs = _plan(run, find_images(folder, options.recursive))
    if jobs:
        captioner.load()
    size, started = captioner.options.batch_size, time.perf_counter()
    if progress:
        progress(0, len(jobs))
    try:
        for start in range(0, len(jobs), size):
            if _stop_requested(stop):
                run.report.stopped = True
                break
            _caption_batch(run, jobs[start:start + size])
            if progress:
                progress(min(start + size, len(jobs)), len(jobs))
    finally:
        if csv_path and run.csv_rows and run.report.captioned:
            write_caption_csv(csv_path, run.csv_rows)
    run.report.seconds = time.perf_counter() - started
    run.report.images_per_s = run.report.captioned / run.report.seconds if run.report.seconds > 0 else 0.0
    return run.report
