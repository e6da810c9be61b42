"""A stand-in AUTOMATIC1111 WebUI 1.10 for the tests that run without one, and helpers to probe a job in it.

`installed(sd_model, data_dir, args)` starts it the way the WebUI starts, for one with-block: the stand-in
`modules` package and the built-in Lora extension's top-level modules (`networks`, `network`,
`network_lora`) go on sys.path; the WebUI's command line (`--data-dir data_dir` plus `args`) is read, after
every extension's `preload(parser)`, this extension's own `preload.py` included (copied into
`<data_dir>/extensions/`); `sd_model` becomes `shared.sd_model` with the attributes A1111's model loader and the
built-in's model-loaded callback give it. `sd_model` is an ldm LatentDiffusion (SD1) or the tiny SDXL of
`lora_train.tiny_sdxl.build_tiny_sdxl`, which gets what sgm's constructors, A1111's loader, sd_models_xl and the
hijack give an SDXL model. Afterwards sys.path, sys.modules and $COMMANDLINE_ARGS are as they
were, so other test files never see a `modules` package.

Stand-in modules (each says what it keeps of A1111 1.10.1): modules.shared (cmd_opts, opts, state, sd_model),
shared_state, shared_cmd_options + cmd_args + script_loading (flags, preloads), paths_internal, call_queue +
fifo_lock (queue_lock), progress (task queue, progressapi), processing (txt2img through the loaded model),
prompt_parser (SdConditioning), sd_models, sd_models_xl, sd_hijack_clip (SDXL's text-encoder wrappers), devices,
options, script_callbacks, infotext_utils; extensions-builtin/Lora: preload, network, network_lora, networks.
Not reproduced: fp16 weights, the hijack's wrapper around SD1's and SD2's text encoder and the text encoders' token
embeddings, the built-in's patched torch-layer forwards, `<lora:...>` in prompts. SD2 is an ldm model whose text
encoder is ldm's FrozenOpenCLIPEmbedder itself (its `nn.MultiheadAttention` layers merge LoRAs as the built-in
does).

Helpers: `ProbeHost` (the real A1111Host, recording progress reports and pausing a job at a step),
`queue_lock_held`, `train_values`, `load_tiny_ldm`.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shlex
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence

import torch

from lora_train.webui.a1111 import A1111Host

STANDIN = Path(__file__).resolve().parent
LORA_EXTENSION = STANDIN / "extensions-builtin" / "Lora"
REPO = STANDIN.parents[1]
EXTENSION_FOLDER = "sd-webui-lora-train"
LORA_MODULES = ("networks", "network", "network_lora")  # the built-in Lora extension's top-level modules
CHECKPOINT = "tiny-sd1.safetensors"
SDXL_CHECKPOINT = "tiny-sdxl.safetensors"
PAUSE_TIMEOUT_S = 60  # a paused job gives up waiting after this (a test that failed before resuming it)


def _standin_module(name: str) -> bool:
    return name == "modules" or name.startswith("modules.") or name in LORA_MODULES


@contextlib.contextmanager
def started(data_dir: Path, args: Sequence[str], paths: Sequence[Path],
            is_standin: Callable[[str], bool]) -> Iterator:
    """A stand-in WebUI's process state for a with-block: this extension's preload.py in <data_dir>/extensions,
    the command line `--data-dir data_dir` plus args, `paths` first on sys.path; yields modules.shared. Afterwards
    sys.path, the modules `is_standin` names and $COMMANDLINE_ARGS are as they were."""
    data_dir = Path(data_dir)
    extension = data_dir / "extensions" / EXTENSION_FOLDER
    extension.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "preload.py", extension / "preload.py")
    saved_path, saved_args = list(sys.path), os.environ.get("COMMANDLINE_ARGS")
    saved_modules = {name: sys.modules.pop(name) for name in [n for n in sys.modules if is_standin(n)]}
    os.environ["COMMANDLINE_ARGS"] = shlex.join(["--data-dir", str(data_dir), *args])
    sys.path[:0] = [str(path) for path in paths]
    try:
        yield importlib.import_module("modules.shared")
    finally:
        for name in [n for n in sys.modules if is_standin(n)]:
            del sys.modules[name]
        sys.modules.update(saved_modules)
        sys.path[:] = saved_path
        if saved_args is None:
            os.environ.pop("COMMANDLINE_ARGS", None)
        else:
            os.environ["COMMANDLINE_ARGS"] = saved_args


@contextlib.contextmanager
def installed(sd_model: Optional[torch.nn.Module], data_dir: Path, args: Sequence[str] = ()) -> Iterator:
    """The stand-in WebUI for a with-block, holding sd_model (None: no checkpoint loaded); yields modules.shared."""
    with started(data_dir, args, [STANDIN, LORA_EXTENSION], _standin_module) as shared:
        importlib.import_module("networks")  # the built-in's scripts import it at start-up
        if sd_model is not None:
            load_model(shared, sd_model)
        yield shared


def load_model(shared, sd_model: torch.nn.Module) -> None:
    """What A1111's sd_models.load_model leaves on the model, then the built-in Lora's model-loaded callback.

    The WebUI does not freeze the UNet, and the CLIP text encoders' token embeddings (replaced by the hijack) are in
    training mode: both are set here so that a job must restore them exactly.
    """
    from modules import paths_internal, sd_models

    import networks

    sdxl = hasattr(sd_model, "conditioner")
    is_sd1 = not sdxl and hasattr(sd_model.cond_stage_model, "transformer")  # SD2's is OpenCLIP: `.model`
    sd_model.is_sd1, sd_model.is_sd2, sd_model.is_sdxl = is_sd1, not (sdxl or is_sd1), sdxl
    sd_model.sd_checkpoint_info = sd_models.CheckpointInfo(
        os.path.join(paths_internal.models_path, "Stable-diffusion", SDXL_CHECKPOINT if sdxl else CHECKPOINT))
    sd_model.sd_model_checkpoint = sd_model.sd_checkpoint_info.filename
    for parameter in sd_model.model.parameters():
        parameter.requires_grad_(True)
    if sdxl:
        _load_sdxl(sd_model)
    elif is_sd1:
        sd_model.cond_stage_model.transformer.text_model.embeddings.token_embedding.train()
    shared.sd_model = sd_model
    networks.assign_network_names_to_compvis_modules(sd_model)
    if sdxl:
        sd_model.cond_stage_model_empty_prompt = sd_model.get_learned_conditioning([""])["crossattn"]


def _disabled_train(self, mode=True):
    """sgm's disabled_train: "Overwrite model.train with this function to make sure train/eval mode does not
    change anymore." """
    return self


def _load_sdxl(sd_model: torch.nn.Module) -> None:
    """sgm's constructors (embedders not is_trainable and the VAE frozen, in eval mode, their train() a no-op),
    A1111's extend_sdxl and the hijack (a wrapper around each text embedder, the conditioner as cond_stage_model)."""
    from modules import sd_hijack_clip, sd_models_xl

    sd_model.__class__ = sd_models_xl.DiffusionEngine  # the WebUI patches its methods onto sgm's class
    sd_model.is_sdxl_inpaint, sd_model.is_ssd = False, False
    conditioner = sd_model.conditioner
    for frozen in (*[e for e in conditioner.embedders if not e.is_trainable], sd_model.first_stage_model):
        frozen.eval()
        frozen.train = _disabled_train
        for parameter in frozen.parameters():
            parameter.requires_grad_(False)
    sd_models_xl.extend_sdxl(sd_model)
    te1, te2 = conditioner.embedders[0], conditioner.embedders[1]
    te1.transformer.text_model.embeddings.token_embedding.train()
    te2.model.token_embedding.train()
    conditioner.embedders[0] = sd_hijack_clip.FrozenCLIPEmbedderForSDXLWithCustomWords(te1)
    conditioner.embedders[1] = sd_hijack_clip.FrozenOpenCLIPEmbedder2WithCustomWords(te2)
    sd_model.cond_stage_model = conditioner


def queue_lock_held() -> bool:
    """Whether anyone (this thread included: the lock is not re-entrant) holds the WebUI's queue lock."""
    from modules import call_queue

    if call_queue.queue_lock.acquire(blocking=False):
        call_queue.queue_lock.release()
        return False
    return True


@dataclass
class Report:
    """What the WebUI showed when a job reported progress."""

    step: int
    text: str
    job: str  # shared.state.job
    lock_held: bool


class ProbeHost(A1111Host):
    """The real host, recording each progress report; with pause_at, the job waits at that step.

    At the pause the job holds the queue lock; `paused` is set, and the job goes on when the test sets
    `resume`, which makes a running job's timing deterministic (no sleeps).
    """

    def __init__(self, pause_at: Optional[int] = None):
        self.pause_at = pause_at
        self.paused, self.resume = threading.Event(), threading.Event()
        self.reports: List[Report] = []

    def report(self, step: int, total: int, text: str) -> None:
        super().report(step, total, text)
        self.reports.append(Report(step, text, self.shared().state.job, queue_lock_held()))
        if step == self.pause_at and not self.paused.is_set():
            self.paused.set()
            if not self.resume.wait(PAUSE_TIMEOUT_S):
                raise RuntimeError(f"the test did not resume the job within {PAUSE_TIMEOUT_S} s")


def wait_for_pause(host: ProbeHost, job, timeout_s: float = PAUSE_TIMEOUT_S) -> None:
    """Returns once the job has paused at host.pause_at; fails at once if the job ends before it gets there."""
    deadline = time.monotonic() + timeout_s
    while not host.paused.wait(0.05):
        assert not job.done.is_set(), f"the job ended before step {host.pause_at}: {job.snapshot()}"
        assert time.monotonic() < deadline, f"the job did not reach step {host.pause_at} in {timeout_s} s"


def train_values(images: Path, name: str, steps: int = 2, **output) -> dict:
    """A small train request for the tiny model: 64 px, rank 4, a few steps."""
    return {"data": {"train_data_dir": str(images), "resolution": 64, "min_bucket_reso": 64,
                     "max_bucket_reso": 128},
            "model": {"lora_rank": 4, "alpha": 4},
            "training": {"batch_size": 4, "max_train_steps": steps, "learning_rate": 3e-3},
            "output": {"output_name": name, **output}}


def load_tiny_ldm(checkpoint: Path) -> torch.nn.Module:
    """The tiny checkpoint as an ldm LatentDiffusion (what the WebUI holds), with the file's weights."""
    import yaml
    from safetensors.torch import load_file

    from lora_train.tiny import build_tiny_ldm

    model = build_tiny_ldm(yaml.safe_load(Path(checkpoint).with_suffix(".yaml").read_text()), seed=0)
    model.load_state_dict(load_file(str(checkpoint)))
    return model
