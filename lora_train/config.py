"""Training configuration: one dataclass per YAML section, loaded and validated at the boundary.

The YAML keeps the sections and key names of `configs/lora_default.yaml`. Every user mistake (an unknown key, a
wrong type, a value out of range, a folder that does not exist) raises `ConfigError` with the key path and the
fix, never a traceback from deep inside training. Relative paths in a YAML file are resolved against the folder
that holds the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import yaml

DEFAULT_CONFIG_PATH = Path(__file__).parent / "configs" / "lora_default.yaml"

LR_SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear")
OPTIMIZERS = ("AdamW", "AdamW8bit", "Prodigy", "Lion")
MIXED_PRECISION = ("no", "fp16", "bf16")
MATMUL_PRECISION = ("default", "highest", "high", "medium")  # torch.set_float32_matmul_precision
SAVE_PRECISION = ("fp16", "bf16", "fp32")
PREDICTIONS = ("auto", "epsilon", "v_prediction")  # auto: what the checkpoint says (DiffusionModel.prediction)


class ConfigError(ValueError):
    """A configuration value a user must fix; the message names the key and the fix."""


def _fail(key: str, value: Any, fix: str) -> None:
    raise ConfigError(f"{key}: {value!r} is not valid; {fix}")


def _check_range(key: str, value: float, low: Optional[float] = None, high: Optional[float] = None) -> None:
    if low is not None and value < low:
        _fail(key, value, f"use a value >= {low}")
    if high is not None and value > high:
        _fail(key, value, f"use a value <= {high}")


def _check_choice(key: str, value: str, choices: tuple) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        _fail(key, value, f"use one of {', '.join(choices)}{hint}")


@dataclass
class DataConfig:
    train_data_dir: str = ""  # folder of training images (jpg, jpeg, png, webp, bmp); required
    metadata_path: Optional[str] = None  # metadata.csv (filename,prompt); None: <train_data_dir>/metadata.csv if any
    resolution: int = 512  # training side length; buckets keep area <= resolution**2
    repeats: int = 1  # how often each image is seen per epoch
    caption_extension: str = ".txt"  # sidecar caption files: image.png -> image.txt
    shuffle_captions: bool = False  # shuffle comma-separated tags each time (after keep_tokens)
    keep_tokens: int = 0  # leading comma-separated tags never shuffled (e.g. the trigger word)
    caption_dropout: float = 0.0  # probability of training a sample with an empty caption
    flip_aug: bool = False  # random horizontal flips (only for subjects without a handed side)
    enable_bucket: bool = True  # aspect-ratio buckets instead of square crops
    min_bucket_reso: Optional[int] = None  # smallest bucket side; None = follows resolution (256 at 512)
    max_bucket_reso: Optional[int] = None  # largest bucket side; None = follows resolution (1024 at 512)

    def validate(self, section: str = "data") -> None:
        if not self.train_data_dir:
            _fail(f"{section}.train_data_dir", self.train_data_dir, "set it to the folder that holds your images")
        if not Path(self.train_data_dir).is_dir():
            _fail(f"{section}.train_data_dir", self.train_data_dir, "the folder does not exist; check the path")
        if self.metadata_path and not Path(self.metadata_path).is_file():
            _fail(f"{section}.metadata_path", self.metadata_path,
                  "the file does not exist; fix the path or remove the key")
        for name in ("resolution", "min_bucket_reso", "max_bucket_reso"):
            value = getattr(self, name)
            if value is None:
                continue
            _check_range(f"{section}.{name}", value, 64, 4096)
            if value % 64:
                _fail(f"{section}.{name}", value, "use a multiple of 64 (e.g. 512, 768, 1024)")
        low, high = self.bucket_range
        if low > high:
            _fail(f"{section}.min_bucket_reso", low, f"it must not exceed data.max_bucket_reso ({high})")
        _check_range(f"{section}.repeats", self.repeats, 1)
        _check_range(f"{section}.keep_tokens", self.keep_tokens, 0)
        _check_range(f"{section}.caption_dropout", self.caption_dropout, 0.0, 1.0)
        if not self.caption_extension.startswith("."):
            _fail(f"{section}.caption_extension", self.caption_extension, "start it with a dot, e.g. '.txt'")

    @property
    def bucket_range(self) -> Tuple[int, int]:
        """(smallest, largest) bucket side: the values set, else what follows the resolution."""
        low, high = follow_resolution(self.resolution)
        return (low if self.min_bucket_reso is None else self.min_bucket_reso,
                high if self.max_bucket_reso is None else self.max_bucket_reso)


def follow_resolution(resolution: int) -> Tuple[int, int]:
    """Bucket limits for a resolution when the user sets none: kohya's 256..1024 at 512, the smallest side at
    most half the resolution (so small resolutions have buckets), the largest at least twice it."""
    return max(64, min(256, resolution // 2 // 64 * 64)), max(1024, 2 * resolution)


@dataclass
class ModelConfig:
    base_model: str = ""  # .safetensors checkpoint or diffusers folder; empty in the WebUI = the loaded model
    lora_rank: int = 8  # LoRA rank (network_dim): capacity of the adapter
    alpha: float = 8.0  # LoRA alpha; the update is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapter input
    train_text_encoder: bool = True  # also adapt the text encoder (stronger trigger words)
    conv_rank: int = 0  # rank for ResNet/sample convolutions (LoCon); 0 = attention layers only
    conv_alpha: float = 1.0  # alpha for the convolution adapters
    prediction: str = "auto"  # auto (what the checkpoint says) | epsilon | v_prediction (a v-pred file without marker)

    def validate(self, section: str = "model") -> None:
        if self.base_model:
            path = Path(self.base_model)
            if not path.exists():
                _fail(f"{section}.base_model", self.base_model, "the checkpoint does not exist; check the path")
        _check_range(f"{section}.lora_rank", self.lora_rank, 1, 1024)
        _check_range(f"{section}.alpha", self.alpha, 0.0)
        if self.alpha == 0:
            _fail(f"{section}.alpha", self.alpha, "use a value > 0 (commonly equal to lora_rank or half of it)")
        _check_range(f"{section}.dropout", self.dropout, 0.0, 0.9)
        _check_range(f"{section}.conv_rank", self.conv_rank, 0, 1024)
        _check_range(f"{section}.conv_alpha", self.conv_alpha, 0.0)
        _check_choice(f"{section}.prediction", self.prediction, PREDICTIONS)


@dataclass
class TrainingConfig:
    batch_size: int = 4  # images per step
    epochs: int = 10  # passes over the dataset (times repeats)
    max_train_steps: Optional[int] = None  # stop after this many optimizer steps; overrides epochs when set
    learning_rate: float = 2e-4  # UNet adapter learning rate
    text_encoder_lr: Optional[float] = None  # text-encoder adapter learning rate; None = learning_rate / 2
    lr_scheduler: str = "constant"  # constant | constant_with_warmup | cosine | cosine_with_restarts | linear
    lr_warmup_steps: int = 0  # linear warm-up from 0 over this many steps
    optimizer: str = "AdamW"  # AdamW | AdamW8bit (bitsandbytes) | Prodigy (prodigyopt) | Lion (lion-pytorch)
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    max_grad_norm: float = 1.0  # clip gradients to this norm; 0 = no clipping
    mixed_precision: str = "fp16"  # no | fp16 | bf16 on a GPU; the CPU always trains in fp32
    gradient_checkpointing: bool = False  # trade ~30% speed for much less activation memory
    cache_latents: bool = True  # encode every image (and its flip, with flip_aug) once before training
    cache_latents_to_disk: bool = False  # keep cached latents in <output_dir>/latent_cache, not RAM (big sets)
    cache_text_encoder_outputs: bool = True  # encode each caption once when the text encoder is not trained
    channels_last: bool = True  # UNet convolutions in channels-last memory order: same results, faster on CPUs
    matmul_precision: str = "default"  # fp32 matmuls: default (as set) | highest | high (TF32) | medium (bf16)
    compile: bool = False  # torch.compile the UNet: a slow first step, then faster steps
    noise_offset: float = 0.0  # adds offset noise (0.05-0.1 helps very dark/bright images)
    min_snr_gamma: Optional[float] = None  # Min-SNR loss weighting (5 is common); None = off
    zero_terminal_snr: bool = False  # rescale the schedule so the last step is pure noise (v-prediction only)
    seed: int = 42  # same seed, data and settings = same LoRA
    resume_from_checkpoint: Optional[str] = None  # a checkpoint folder written by save_steps

    def validate(self, section: str = "training") -> None:
        _check_range(f"{section}.batch_size", self.batch_size, 1, 1024)
        _check_range(f"{section}.epochs", self.epochs, 1)
        if self.max_train_steps is not None:
            _check_range(f"{section}.max_train_steps", self.max_train_steps, 1)
        for name in ("learning_rate", "text_encoder_lr"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                _fail(f"{section}.{name}", value, "use a value in (0, 1], e.g. 1e-4")
        _check_choice(f"{section}.lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        _check_range(f"{section}.lr_warmup_steps", self.lr_warmup_steps, 0)
        _check_choice(f"{section}.optimizer", self.optimizer, OPTIMIZERS)
        _check_range(f"{section}.gradient_accumulation_steps", self.gradient_accumulation_steps, 1, 1024)
        _check_range(f"{section}.max_grad_norm", self.max_grad_norm, 0.0)
        _check_choice(f"{section}.mixed_precision", self.mixed_precision, MIXED_PRECISION)
        _check_choice(f"{section}.matmul_precision", self.matmul_precision, MATMUL_PRECISION)
        _check_range(f"{section}.noise_offset", self.noise_offset, 0.0, 1.0)
        if self.min_snr_gamma is not None:
            _check_range(f"{section}.min_snr_gamma", self.min_snr_gamma, 0.0)
            if self.min_snr_gamma == 0:
                _fail(f"{section}.min_snr_gamma", 0, "use a value > 0 (5 is common) or null to turn it off")
        if self.resume_from_checkpoint and not Path(self.resume_from_checkpoint).is_dir():
            _fail(f"{section}.resume_from_checkpoint", self.resume_from_checkpoint,
                  "point it at a checkpoint folder written by output.save_steps")

    @property
    def effective_text_encoder_lr(self) -> float:
        return self.text_encoder_lr if self.text_encoder_lr is not None else self.learning_rate / 2


@dataclass
class OutputConfig:
    output_dir: str = "output"  # where the LoRA, checkpoints and previews go
    output_name: str = "my_lora"  # file name without extension; also the name in <lora:NAME:0.8>
    save_steps: int = 0  # write a resumable checkpoint every N steps; 0 = off
    save_every_n_epochs: int = 0  # also write NAME-000N.safetensors every N epochs; 0 = off
    save_precision: str = "fp16"  # fp16 | bf16 | fp32 tensors in the .safetensors file
    logging_dir: Optional[str] = None  # TensorBoard event files; None = <output_dir>/logs
    checkpoint_dir: Optional[str] = None  # resumable checkpoints; None = <output_dir>/checkpoints
    overwrite: bool = False  # replace an existing NAME.safetensors instead of refusing

    def validate(self, section: str = "output") -> None:
        name = self.output_name
        if not name or name.strip() != name or any(c in name for c in '/\\:*?"<>|') or name.startswith("."):
            _fail(f"{section}.output_name", name,
                  "use a plain file name without folders, dots at the start or any of / \\ : * ? \" < > |")
        _check_range(f"{section}.save_steps", self.save_steps, 0)
        _check_range(f"{section}.save_every_n_epochs", self.save_every_n_epochs, 0)
        _check_choice(f"{section}.save_precision", self.save_precision, SAVE_PRECISION)

    @property
    def lora_path(self) -> Path:
        return Path(self.output_dir) / f"{self.output_name}.safetensors"

    @property
    def log_dir(self) -> Path:
        return Path(self.logging_dir) if self.logging_dir else Path(self.output_dir) / "logs"

    @property
    def latent_cache_dir(self) -> Path:
        return Path(self.output_dir) / "latent_cache"

    @property
    def checkpoints_dir(self) -> Path:
        return Path(self.checkpoint_dir) if self.checkpoint_dir else Path(self.output_dir) / "checkpoints"


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def validate(self, require_base_model: bool = True) -> "TrainConfig":
        """Checks every section; raises ConfigError naming the first bad key."""
        if require_base_model and not self.model.base_model:
            _fail("model.base_model", "", "set it to a .safetensors checkpoint or a diffusers folder")
        for section in SECTIONS:
            getattr(self, section).validate(section)
        if self.model.prediction != "auto":
            check_zero_terminal_snr(self.training.zero_terminal_snr, self.model.prediction)
        return self

    def to_dict(self) -> Dict[str, Dict[str, Any]]:
        return dataclasses.asdict(self)


def check_zero_terminal_snr(zero_terminal_snr: bool, prediction: str) -> None:
    """Refuses zero-terminal SNR for an epsilon-prediction model (Lin et al. 2023, arXiv:2305.08891, section 3.2).

    At the last step the model sees pure noise, so the epsilon target is its own input (nothing to learn), and
    a sampler's x0 = (x_t - sqrt(1 - a) * eps) / sqrt(a) divides by a = 0 there. The paper trains such schedules
    with v-prediction; kohya only warns, which yields LoRAs that do not sample well, so this refuses.
    """
    if zero_terminal_snr and prediction != "v_prediction":
        _fail("training.zero_terminal_snr", True,
              f"the model predicts {prediction}, and with zero terminal SNR the last step's input is pure noise: "
              "an epsilon model learns nothing there and cannot be sampled from it; use model.prediction: "
              "v_prediction (only for a v-prediction checkpoint) or set training.zero_terminal_snr: false")


SECTIONS = {"data": DataConfig, "model": ModelConfig, "training": TrainingConfig, "output": OutputConfig}
PATH_KEYS = {"data": ("train_data_dir", "metadata_path"), "model": ("base_model",),
             "training": ("resume_from_checkpoint",), "output": ("output_dir", "logging_dir", "checkpoint_dir")}


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Returns value as the field's type; raises ConfigError naming the key when it cannot be."""
    optional = typing.get_origin(annotation) is typing.Union
    target = typing.get_args(annotation)[0] if optional else annotation
    if value is None:
        if optional:
            return None
        _fail(key, value, f"give a {target.__name__} value")
    if target is bool:
        if isinstance(value, bool):
            return value
        _fail(key, value, "use true or false")
    if target is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if target is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if target is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads 1e-4 (no dot) as a string
        except ValueError:
            pass
    if target is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    _fail(key, value, f"use a {target.__name__} value")


def _section_from_dict(section: str, values: Any, base_dir: Optional[Path]) -> Any:
    cls = SECTIONS[section]
    if values is None:
        values = {}
    if not isinstance(values, dict):
        _fail(section, values, "write the section as 'key: value' lines")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean {section}.{close[0]}?" if close else f"valid keys: {', '.join(names)}"
            raise ConfigError(f"{section}.{key}: unknown key; {hint}")
        value = _coerce(f"{section}.{key}", value, hints[key])
        if base_dir is not None and key in PATH_KEYS[section] and value:
            value = str((base_dir / Path(value).expanduser()).resolve())
        kwargs[key] = value
    return cls(**kwargs)


def config_from_dict(values: Dict[str, Any], base_dir: Optional[Path] = None) -> TrainConfig:
    """Builds a TrainConfig from nested dicts (YAML or JSON); unset keys keep their defaults.

    Raises:
        ConfigError: an unknown section or key, or a value of the wrong type.
    """
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError("the config must be a mapping with the sections data, model, training and output")
    for section in values:
        if section not in SECTIONS:
            close = difflib.get_close_matches(str(section), list(SECTIONS), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid sections: {', '.join(SECTIONS)}"
            raise ConfigError(f"{section}: unknown section; {hint}")
    return TrainConfig(**{s: _section_from_dict(s, values.get(s), base_dir) for s in SECTIONS})


def load_config(path: Path) -> TrainConfig:
    """Reads a YAML file into a TrainConfig (not yet validated); paths resolve against the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; check the path")
    data = path.read_bytes()
    try:
        values = yaml.safe_load(data.decode("utf-8-sig"))
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: is not UTF-8 text ({_where(data, error.start)}); save it as UTF-8") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: {_yaml_problem(error)}; check indentation and quoting") from None
    return config_from_dict(values, base_dir=path.resolve().parent)


def _where(data: bytes, offset: int) -> str:
    """Where an undecodable byte is, as an editor counts: 'byte 0xe9 at line 2, column 23'."""
    line, column = data.count(b"\n", 0, offset) + 1, offset - data.rfind(b"\n", 0, offset)
    return f"byte 0x{data[offset]:02x} at line {line}, column {column}"


def _yaml_problem(error: "yaml.YAMLError") -> str:
    """PyYAML's multi-line report in one line: what is wrong and where."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"is not valid YAML: {where}{problem}"


def save_config(config: TrainConfig, path: Path) -> None:
    """Writes the config as YAML, one section per block, in field order."""
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
