"""sd-webui-lora-train: registers the LoRA Train tab, its settings and its API routes with the WebUI."""

from modules import script_callbacks

from lora_train.webui import callbacks

script_callbacks.on_ui_tabs(callbacks.ui_tabs)
script_callbacks.on_ui_settings(callbacks.ui_settings)
script_callbacks.on_app_started(callbacks.app_started)
script_callbacks.on_script_unloaded(callbacks.script_unloaded)
