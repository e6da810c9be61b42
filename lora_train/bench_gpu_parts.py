"""The parts `bench gpu` runs, each returning table rows (dicts) instead of raising: a part that fails says so in
its row and the next part still runs.

- speed: floor / ours / reference (`lora_train.bench_loops`) on one architecture and precision, s/step, peak
  `torch.cuda.max_memory_allocated`, the memory preflight's estimate for ours and estimate / measured;
- fp16 vs fp32: one UNet prediction's loss on the same noise, in fp32 and in fp16, within FP16_TOLERANCE;
- resume: a run stopped after step 3 and resumed from its step-2 checkpoint matches an uninterrupted one;
- out of memory: a per-process memory fraction just above what the model takes ends in
  `TrainingOutOfMemoryError` with `changes`, and the model predicts bit for bit as before.
"""

from __future__ import annotations

import importlib
import math
import tempfile
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, List

import torch

from .bench_loops import BenchSettings, RowResult, bench_config
from .bench_models import build_bench_model, write_bench_images
from .models import SizeInfo

GIB = 1024 ** 3
FP16_TOLERANCE = 1e-2  # |loss fp16 / loss fp32 - 1|: fp16's 10-bit mantissa through ~30 layers of a random UNet
RESUME_LOSS_TOLERANCE = 1e-5  # relative, per step, as tests/test_training.py's resume test
OOM_HEADROOM = 256 * 1024 ** 2  # the memory fraction allows this much above what the model already takes
LOOPS = ("floor", "ours", "reference")
# what each part imports; checked once at start so a missing or broken package is named in the part's row
NEEDS = {"floor": ("diffusers",), "ours": ("diffusers",), "reference": ("diffusers", "peft"),
         "checks": ("diffusers",)}
PROBES = {"diffusers": "from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel",
          "peft": "from peft import LoraConfig", "transformers": "from transformers import CLIPTextModel",
          "safetensors": "from safetensors.torch import load_file"}


def check_requirements() -> Dict[str, str]:
    """Package -> its version, or "missing: ..." / "broken: ..." with the error of the import the bench needs."""
    found = {}
    for package, statement in PROBES.items():
        try:
            exec(statement, {})  # noqa: S102 - fixed import statements above
            found[package] = getattr(importlib.import_module(package), "__version__", "?")
        except ImportError as error:
            found[package] = f"missing: {error}" if package in str(error) else f"broken: {error}"
        except Exception as error:  # a package whose import raises something else is as unusable
            found[package] = f"broken: {type(error).__name__}: {error}"
    return found


def unmet(needs: tuple, requirements: Dict[str, str]) -> str:
    """"" when every needed package imports, else what is wrong and how to fix it."""
    problems = [f"{name} {requirements[name]}" for name in needs if not requirements[name][:1].isdigit()]
    return "; ".join(problems) + ("; install the wheels: see `python -m lora_train bench gpu --help`"
                                  if problems else "")


def error_row(part: str, item: str, error: BaseException) -> Dict:
    last = traceback.extract_tb(error.__traceback__)[-1:] if error.__traceback__ else []
    where = f" ({Path(last[0].filename).name}:{last[0].lineno})" if last else ""
    return {"part": part, "item": item, "status": "failed", "detail": f"{type(error).__name__}: {error}{where}"}


def speed_rows(part: str, settings: BenchSettings, run_one: Callable[[str, BenchSettings], RowResult],
               requirements: Dict[str, str]) -> List[Dict]:
    """One row per loop; a loop that fails or whose needs are unmet gets its error in its row."""
    rows = []
    for name in LOOPS:
        problem = unmet(NEEDS[name], requirements)
        if problem:
            rows.append({"part": part, "item": name, "status": "skipped", "detail": problem})
            continue
        try:
            rows.append(_speed_row(part, name, run_one(name, settings), settings.device))
        except Exception as error:  # the row says what failed, the next loop runs
            rows.append(error_row(part, name, error))
    return rows


def _speed_row(part: str, name: str, result: RowResult, device: str) -> Dict:
    finite = all(math.isfinite(loss) for loss in result.losses)
    row = {"part": part, "item": name, "status": "ok" if finite else "failed", "s_per_step": result.median_ms / 1000,
           "losses": result.losses, "detail": "" if finite else "a loss is not finite"}
    if device.startswith("cuda"):
        row["peak_bytes"] = result.peak_bytes
        if result.estimate_bytes:
            row["estimate_bytes"] = result.estimate_bytes
            row["estimate_ratio"] = result.estimate_bytes / result.peak_bytes
    elif result.estimate_bytes:
        row["estimate_bytes"] = result.estimate_bytes
    return row


def check_rows(settings: BenchSettings, requirements: Dict[str, str]) -> List[Dict]:
    """fp16 vs fp32, resume and out of memory on one model of `settings.model`, each guarded."""
    problem = unmet(NEEDS["checks"], requirements)
    checks = {"fp16 vs fp32": _fp16_vs_fp32, "resume": _resume, "out of memory": _out_of_memory}
    if problem:
        return [{"part": "check", "item": name, "status": "skipped", "detail": problem} for name in checks]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as folder:
        device = torch.device(settings.device)
        try:
            images = write_bench_images(Path(folder) / "images", settings)
            model = build_bench_model(settings.model, device, dtype=torch.float32)
        except Exception as error:
            return [error_row("check", name, error) for name in checks]
        for name, check in checks.items():
            try:
                status, detail = check(model, images, settings, Path(folder) / name.replace(" ", "-"))
                rows.append({"part": "check", "item": name, "status": status, "detail": detail})
            except Exception as error:
                rows.append(error_row("check", name, error))
    return rows


def _probe_loss(model, settings: BenchSettings) -> torch.Tensor:
    """The MSE of one prediction of fixed noise at a fixed timestep (64 px), in the model's current dtype."""
    generator = torch.Generator().manual_seed(settings.seed)
    noise = torch.randn((1, model.unet.config.in_channels, 8, 8), generator=generator).to(model.device)
    with torch.no_grad():
        cond = model.encode_prompts(["a probe"], [SizeInfo.square(64)])
        prediction = model.predict(noise, torch.tensor([500], device=model.device), cond)
    return torch.nn.functional.mse_loss(prediction.float(), noise)


def _working_dtype(settings: BenchSettings) -> torch.dtype:
    return torch.float16 if torch.device(settings.device).type == "cuda" else torch.float32


def _fp16_vs_fp32(model, _images: Path, settings: BenchSettings, _out: Path):
    full = float(_probe_loss(model.to(model.device, torch.float32), settings))
    half = float(_probe_loss(model.to(model.device, torch.float16), settings))
    model.to(model.device, _working_dtype(settings))
    drift = abs(half / full - 1)
    status = "ok" if math.isfinite(half) and drift <= FP16_TOLERANCE else "failed"
    return status, f"loss fp32 {full:.6f}, fp16 {half:.6f}: |fp16/fp32 - 1| {drift:.1e} (<= {FP16_TOLERANCE:g})"


def _resume(model, images: Path, settings: BenchSettings, out: Path):
    from safetensors.torch import load_file

    from .pipeline import train_lora

    settings = replace(settings, warmup=0, steps=4)
    straight = train_lora(bench_config(images, settings, out / "a"), model)
    first = bench_config(images, settings, out / "b")
    first.output.save_steps = 2
    stop = lambda event, trainer: trainer.request_stop("discard") if trainer.position.step == 3 else None  # noqa
    train_lora(first, model, callbacks=[stop])
    resumed = train_lora(bench_config(images, settings, out / "b", resume_from_checkpoint=str(
        out / "b" / "output" / "checkpoints" / "bench-step000002")), model)
    loss_drift = max(abs(a / b - 1) for a, b in zip(resumed.losses, straight.losses))
    expected = load_file(str(straight.lora_path))
    tensor_drift = max(float((value.float() - expected[key].float()).abs().max())
                       for key, value in load_file(str(resumed.lora_path)).items())
    exact = resumed.steps == straight.steps == 4 and loss_drift <= RESUME_LOSS_TOLERANCE and tensor_drift <= 1e-5
    return ("ok" if exact else "failed"), (f"steps {resumed.steps}/{straight.steps}, max relative loss difference "
                                           f"{loss_drift:.1e} (<= {RESUME_LOSS_TOLERANCE:g}), max LoRA weight "
                                           f"difference {tensor_drift:.1e} (<= 1e-05)")


def _out_of_memory(model, images: Path, settings: BenchSettings, out: Path):
    from .pipeline import TrainingOutOfMemoryError, train_lora

    device = torch.device(settings.device)
    if device.type != "cuda":
        return "skipped", "needs a GPU: a per-process memory fraction limits CUDA memory only"
    before = _probe_loss(model, settings)
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_allocated(device) + OOM_HEADROOM) / total, device)
    try:
        train_lora(bench_config(images, replace(settings, warmup=0, steps=2), out), model)
        return "failed", "training fitted in the memory fraction: no out-of-memory to handle"
    except TrainingOutOfMemoryError as error:
        advice = error
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        torch.cuda.empty_cache()
    intact = torch.equal(_probe_loss(model, settings), before) and not any(
        p.requires_grad for p in model.unet.parameters())
    status = "ok" if advice.changes and intact else "failed"
    return status, f"changes {advice.changes}; model {'intact' if intact else 'CHANGED'}; message: {advice}"
