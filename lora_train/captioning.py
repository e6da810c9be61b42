"""Auto-captioning models: BLIP or GIT writes a sentence for an image; `create_captioner` also picks a WD14 tagger.

`create_captioner(model, options)` reads the model's config and returns the captioner for its `model_type`
("blip" or "git"); a hub id or a local folder (loaded with no network) both work. A WD14 tagger (a
`SmilingWolf/wd-*-tagger-*` id or a folder with `model.onnx` and `selected_tags.csv`) gets
`lora_train.tagger.WdTagger` instead. The weights load once, on first use or `load()`, and `unload()` frees them
(the next caption call loads them again). `lora_train.caption_writer.caption_folder` writes a folder's captions
with any of them.
"""

from __future__ import annotations

import abc
import gc
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from PIL import Image

from lora_train.caption_writer import CaptionError
from lora_train.tagger import DEFAULT_TAGGER, TaggerOptions, WdTagger, create_tagger, is_tagger_model

logger = logging.getLogger(__name__)
DEFAULT_MODEL = "Salesforce/blip-image-captioning-large"
DTYPES = ("auto", "fp16", "bf16", "fp32")
# A checkpoint prompted with booru tags names its lineage, or has such tags in its training metadata.
BOORU_NAMES = ("pony", "illustrious", "noob", "animagine", "anime", "booru")
BOORU_TAGS = ("1girl", "1boy", "1other", "score_9", "score_8_up")
NAME_KEYS = ("modelspec.title", "modelspec.description", "modelspec.tags", "ss_output_name")


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
    writes_tags = False
    empty_reason = "the model generated an empty caption"

    def __init__(self, source: str, local: bool, options: CaptionOptions) -> None:
        options.validate()
        self.source, self.local, self.options = source, local, options
        self.model: Any = None
        self.processor: Any = None

    @property
    def loaded(self) -> bool:
        return self.model is not None

    @property
    def batch_size(self) -> int:
        return self.options.batch_size

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
        """The options' lengths, clamped to the text positions the loaded model has (a small model's limit)."""
        config = self.model.config
        limit = getattr(getattr(config, "text_config", config), "max_position_embeddings", None)
        max_length = min(self.options.max_length, limit) if limit else self.options.max_length
        if max_length < self.options.max_length:
            logger.info("max_length %d clamped to the %d text positions of %s", self.options.max_length, limit,
                        self.source)
        return {"max_length": max_length, "min_length": min(self.options.min_length, max_length),
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


def create_captioner(model: str = DEFAULT_MODEL, options: Optional[CaptionOptions] = None,
                     tagger_options: Optional[TaggerOptions] = None) -> Union[Captioner, WdTagger]:
    """The captioner for the model: a WD14 tagger (see `is_tagger_model`, options from tagger_options), else the
    BLIP or GIT captioner for its config's `model_type`; the weights load on first use (or `load()`)."""
    if is_tagger_model(model):
        return create_tagger(model, tagger_options)
    _, transformers = require_torch_transformers()
    source, local = _model_source(model)
    try:
        model_type = _from_pretrained(transformers.AutoConfig, source, local_files_only=local).model_type
    except OSError as error:  # not downloaded and no hub, or no such repository
        raise CaptionError(f"caption model {model!r} cannot be loaded ({str(error).splitlines()[0]}); give a "
                           "local model folder, or a hub id that is downloaded already") from None
    if model_type not in FAMILIES:
        raise CaptionError(f"{model!r} is a {model_type!r} model, not a captioning model; use a BLIP "
                           f"({DEFAULT_MODEL}) or GIT (microsoft/git-base) model, or a WD14 tagger "
                           "(SmilingWolf/wd-vit-tagger-v3)")
    return FAMILIES[model_type](source, local, options or CaptionOptions())


def suggest_caption_model(family: str, name: str, metadata: Dict[str, str]) -> Tuple[str, str]:
    """(model, why) to suggest for a checkpoint: the WD14 tagger for an SDXL-family checkpoint whose name or
    metadata says it is prompted with booru tags (Pony, Illustrious, NoobAI, ...), BLIP otherwise."""
    if family != "sdxl":
        return DEFAULT_MODEL, f"{family.upper()} checkpoints are prompted in sentences"
    names = " ".join([name, *(metadata.get(key, "") for key in NAME_KEYS)]).lower()
    lineage = next((word for word in BOORU_NAMES if word in names), None)
    if lineage:
        return DEFAULT_TAGGER, f"an SDXL checkpoint of the {lineage} kind, prompted with booru tags"
    words = set(re.findall(r"[a-z0-9_]+", " ".join(metadata.values()).lower()))
    found = [tag for tag in BOORU_TAGS if tag in words]
    if found:
        return DEFAULT_TAGGER, f"an SDXL checkpoint whose metadata has booru tags ({', '.join(found)})"
    return DEFAULT_MODEL, "an SDXL checkpoint with no sign of booru-tag prompting"
