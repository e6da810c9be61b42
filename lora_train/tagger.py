"""WD14-family image taggers (SmilingWolf's `wd-*-tagger-v3` and `-v2` ONNX models) through onnxruntime.

Anime-style SDXL checkpoints (Pony, Illustrious, NoobAI) are prompted with booru tags, and a LoRA for them trains
best on captions in that form: `1girl, solo, long hair, ...`. A tagger is a folder, or a hub repository, holding
`model.onnx` and `selected_tags.csv` (tag_id,name,category,count: one row per model output; category 9 is a
rating, 4 a character, 0 a general tag). The model takes NHWC float32 pixels in BGR order, 0-255 with no
normalisation, at the size of its input (448 for the released models): the image padded to a square with white,
then resized. It gives one sigmoid probability per tag.

`WdTagger.caption` writes the characters over `character_threshold`, then the general tags over
`general_threshold`, each most confident first, without the excluded tags; rating tags only when asked for.
`lora_train.caption_writer.caption_folder` writes a folder's captions with it, as it does BLIP's. onnxruntime is
optional: without it `load()` raises ImportError with the pip command.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from lora_train.caption_writer import CaptionError
from lora_train.extras import pip_command

DEFAULT_TAGGER = "SmilingWolf/wd-vit-tagger-v3"
MODEL_FILE, TAGS_FILE = "model.onnx", "selected_tags.csv"
TAGS_HEADER = ("tag_id", "name", "category")
RATING, GENERAL, CHARACTER = 9, 0, 4
KAOMOJI_MAX_LENGTH = 3  # tags this short (^_^, o_o, >_<) are emoticons: their underscores stay


@dataclass
class TaggerOptions:
    general_threshold: float = 0.35  # a general tag is written at this probability or above
    character_threshold: float = 0.85  # a character tag likewise (they need more certainty)
    exclude_tags: Tuple[str, ...] = ()  # never written; "long hair" and "long_hair" both match
    underscores_to_spaces: bool = True  # long_hair -> long hair, as prompts are written (emoticons keep theirs)
    rating_tags: bool = False  # also write the most likely rating tag (general, sensitive, ...) first
    batch_size: int = 8  # images per model call
    device: str = "auto"  # "auto" (CUDA when onnxruntime has it), "cpu", "cuda" or "cuda:N"
    threads: int = 0  # CPU threads of the session; 0: onnxruntime's default (one per core)

    def validate(self) -> None:
        for name in ("general_threshold", "character_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise CaptionError(f"{name} is {getattr(self, name)}; use a probability from 0 to 1, e.g. 0.35")
        for name in ("batch_size", "threads"):
            if getattr(self, name) < (1 if name == "batch_size" else 0):
                raise CaptionError(f"{name} is {getattr(self, name)}; use a value >= {int(name == 'batch_size')}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise CaptionError(f"device {self.device!r} is unknown; use auto, cpu, cuda or cuda:N")


def parse_tag_list(text: str) -> Tuple[str, ...]:
    """Comma-separated tags ("watermark, simple background") as a tuple, blanks left out."""
    return tuple(tag.strip() for tag in (text or "").split(",") if tag.strip())


def is_tagger_model(model: str) -> bool:
    """Whether the model is a WD14 tagger: a folder with selected_tags.csv, or a hub id naming a tagger."""
    path = Path(model).expanduser()
    if path.is_dir():
        return (path / TAGS_FILE).is_file()
    return not path.exists() and "tagger" in model.rsplit("/", 1)[-1].lower()


@dataclass(frozen=True)
class TagTable:
    """selected_tags.csv: the tag of every model output and its category."""

    names: Tuple[str, ...]
    categories: Tuple[int, ...]

    def indices(self, category: int) -> List[int]:
        return [index for index, value in enumerate(self.categories) if value == category]


def read_selected_tags(path: Path) -> TagTable:
    """The tags in file order; raises CaptionError when the file is not a tagger's selected_tags.csv."""
    with Path(path).open(encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows or tuple(cell.strip() for cell in rows[0][:3]) != TAGS_HEADER:
        raise CaptionError(f"{path} does not start with the header tag_id,name,category,count; give the "
                           f"{TAGS_FILE} that came with the tagger model")
    try:
        categories = tuple(int(row[2]) for row in rows[1:] if row)
    except (IndexError, ValueError):
        raise CaptionError(f"{path} has a row without a numeric category; give the {TAGS_FILE} that came with "
                           "the tagger model") from None
    return TagTable(tuple(row[1].strip() for row in rows[1:] if row), categories)


def tagger_files(model: str) -> Tuple[Path, Path]:
    """(model.onnx, selected_tags.csv) of a local folder, or of a hub repository (downloaded, or from the cache)."""
    path = Path(model).expanduser()
    if path.is_dir():
        missing = [name for name in (MODEL_FILE, TAGS_FILE) if not (path / name).is_file()]
        if missing:
            raise CaptionError(f"tagger folder {model!r} has no {' or '.join(missing)}; put the tagger's "
                               f"{MODEL_FILE} and {TAGS_FILE} in it, or give its hub id ({DEFAULT_TAGGER})")
        return path / MODEL_FILE, path / TAGS_FILE
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        raise CaptionError(f"tagger {model!r} is not a folder or a hub id; fix the path or give e.g. {DEFAULT_TAGGER}")
    try:
        from huggingface_hub import hf_hub_download

        return tuple(Path(hf_hub_download(model, name)) for name in (MODEL_FILE, TAGS_FILE))  # type: ignore
    except ImportError as error:
        raise ImportError(f"a tagger hub id needs huggingface_hub ({error}): pip install huggingface_hub, "
                          "or give a local folder with model.onnx and selected_tags.csv") from error
    except (OSError, ValueError) as error:  # not downloaded while offline, no such repository, no network
        raise CaptionError(f"tagger {model!r} cannot be loaded ({str(error).splitlines()[0]}); give a local folder "
                           f"with {MODEL_FILE} and {TAGS_FILE}, or a hub id that is downloaded already") from None


def prepare_image(image: Image.Image, size: int) -> np.ndarray:
    """The tagger's input for one RGB image: padded to a square with white, resized, BGR float32 0-255 (HWC)."""
    side = max(image.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    if side != size:
        square = square.resize((size, size), Image.BICUBIC)
    return np.asarray(square, dtype=np.float32)[:, :, ::-1]


def require_onnxruntime() -> Any:
    """The onnxruntime module, or ImportError with the pip command that installs it."""
    try:
        import onnxruntime
    except ImportError as error:
        raise ImportError(f"the WD14 tagger needs onnxruntime ({error}); install it with: "
                          f"{pip_command('tagger')}") from error
    return onnxruntime


def _display_name(tag: str, underscores_to_spaces: bool) -> str:
    if not underscores_to_spaces or len(tag) <= KAOMOJI_MAX_LENGTH:
        return tag
    return tag.replace("_", " ")


def _normal(tag: str) -> str:
    return " ".join(tag.replace("_", " ").split()).lower()


class WdTagger:
    """One WD14 tagger: an onnxruntime session over model.onnx and the tags of selected_tags.csv."""

    family = "wd14"
    writes_tags = True
    empty_reason = "no tag reached the thresholds; lower general_threshold"

    def __init__(self, model_path: Path, tags_path: Path, options: TaggerOptions) -> None:
        options.validate()
        self.model_path, self.options = Path(model_path), options
        self.tags = read_selected_tags(tags_path)
        self.session: Any = None
        self.image_size = 0
        self._names = [_display_name(tag, options.underscores_to_spaces) for tag in self.tags.names]
        excluded = {_normal(tag) for tag in options.exclude_tags}
        self._kept = [_normal(tag) not in excluded for tag in self.tags.names]

    @property
    def loaded(self) -> bool:
        return self.session is not None

    @property
    def batch_size(self) -> int:
        return self.options.batch_size

    def load(self) -> None:
        """Opens the ONNX session on the chosen device, once, and checks it fits selected_tags.csv."""
        if self.loaded:
            return
        onnxruntime = require_onnxruntime()
        settings = onnxruntime.SessionOptions()
        settings.intra_op_num_threads = self.options.threads
        session = onnxruntime.InferenceSession(str(self.model_path), settings, providers=self._providers(onnxruntime))
        shape, outputs = session.get_inputs()[0].shape, session.get_outputs()[0].shape
        if len(shape) != 4 or shape[3] != 3 or not isinstance(shape[1], int):
            raise CaptionError(f"{self.model_path} takes input {shape}, not NHWC images [batch, size, size, 3]; "
                               "give a WD14 tagger model")
        if isinstance(outputs[-1], int) and outputs[-1] != len(self.tags.names):
            raise CaptionError(f"{self.model_path} gives {outputs[-1]} scores but its {TAGS_FILE} lists "
                               f"{len(self.tags.names)} tags; put the {TAGS_FILE} of this model beside it")
        self.session, self.image_size = session, shape[1]

    def unload(self) -> None:
        """Closes the session and frees its memory."""
        self.session = None

    def _providers(self, onnxruntime: Any) -> List[Any]:
        available = onnxruntime.get_available_providers()
        device = self.options.device
        if device == "cpu" or (device == "auto" and "CUDAExecutionProvider" not in available):
            return ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" not in available:
            raise CaptionError(f"device {device!r} asked for, but this onnxruntime has no CUDA; use device cpu or "
                               "auto, or install onnxruntime-gpu instead of onnxruntime")
        device_id = int(device.split(":")[1]) if ":" in device else 0
        return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]

    def device(self) -> str:
        self.load()
        return "cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu"

    def probabilities(self, images: Sequence[Image.Image], batch_size: Optional[int] = None) -> np.ndarray:
        """[images, tags] sigmoid outputs for RGB images, `batch_size` (default options.batch_size) at a time."""
        self.load()
        size = batch_size or self.options.batch_size
        name = self.session.get_inputs()[0].name
        batches = [self.session.run(None, {name: np.stack([prepare_image(image, self.image_size)
                                                          for image in images[start:start + size]])})[0]
                   for start in range(0, len(images), size)]
        return np.concatenate(batches) if batches else np.zeros((0, len(self.tags.names)), np.float32)

    def caption(self, images: Sequence[Image.Image], batch_size: Optional[int] = None) -> List[str]:
        """One comma-separated tag list per RGB image."""
        return [self.tags_for(scores) for scores in self.probabilities(list(images), batch_size)]

    def tags_for(self, scores: np.ndarray) -> str:
        """The caption for one image's probabilities: rating (when asked), characters, general tags."""
        chosen: List[int] = []
        ratings = [index for index in self.tags.indices(RATING) if self._kept[index]]
        if self.options.rating_tags and ratings:
            chosen.append(max(ratings, key=lambda index: scores[index]))
        other = [index for index, category in enumerate(self.tags.categories) if category not in (RATING, CHARACTER)]
        for indices, threshold in ((self.tags.indices(CHARACTER), self.options.character_threshold),
                                   (other, self.options.general_threshold)):
            passed = [index for index in indices if scores[index] >= threshold and self._kept[index]]
            chosen.extend(sorted(passed, key=lambda index: (-scores[index], index)))
        return ", ".join(self._names[index] for index in chosen)


def create_tagger(model: str, options: Optional[TaggerOptions] = None) -> WdTagger:
    """The tagger of a local folder or hub id; the session opens on first use (or `load()`)."""
    options = options or TaggerOptions()
    options.validate()
    return WdTagger(*tagger_files(model), options)
