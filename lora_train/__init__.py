"""sd-webui-lora-train: caption images and train kohya-format LoRAs, in the WebUI or from the command line.

The version is kept here only: the package metadata, `lora-train --version`, the tab and every LoRA file's
training comment read it.
"""

__version__ = "0.5.0"
