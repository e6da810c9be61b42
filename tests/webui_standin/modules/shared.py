"""Stand-in for modules/shared.py: cmd_opts, opts, state and the loaded checkpoint `sd_model`.

`sd_model` is None until `webui_standin.installed()` loads one, as A1111's sd_models.load_model does (flags
is_sd1/is_sd2/is_sdxl, sd_checkpoint_info, then the model-loaded callbacks).
"""

from modules import options, shared_cmd_options, shared_state

cmd_opts = shared_cmd_options.cmd_opts
parser = shared_cmd_options.parser

OptionInfo = options.OptionInfo
# The built-in settings the stand-in's processing, state and Lora extension read (A1111 1.10's defaults).
opts = options.Options({
    "persistent_cond_cache": OptionInfo(True, "Persistent cond cache"),
    "live_previews_enable": OptionInfo(True, "Show live previews of the created image"),
    "live_previews_image_format": OptionInfo("png", "Live preview file format"),
    "show_progress_every_n_steps": OptionInfo(10, "Live preview display period"),
    "CLIP_stop_at_last_layers": OptionInfo(1, "Clip skip"),
    "sdxl_clip_l_skip": OptionInfo(False, "Clip skip SDXL"),
    "sdxl_crop_top": OptionInfo(0, "crop top coordinate"),
    "sdxl_crop_left": OptionInfo(0, "crop left coordinate"),
    "sdxl_refiner_low_aesthetic_score": OptionInfo(2.5, "SDXL low aesthetic score"),
    "sdxl_refiner_high_aesthetic_score": OptionInfo(6.0, "SDXL high aesthetic score"),
    "lora_preferred_name": OptionInfo("Alias from file", "When adding to prompt, refer to Lora by"),
}, restricted_opts=set())

state = shared_state.State()
parallel_processing_allowed = True
sd_model = None
