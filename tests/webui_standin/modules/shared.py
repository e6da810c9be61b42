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
    "lora_preferred_name": OptionInfo("Alias from file", "When adding to prompt, refer to Lora by"),
}, restricted_opts=set())

state = shared_state.State()
parallel_processing_allowed = True
sd_model = None
