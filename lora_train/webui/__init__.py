"""The WebUI side of sd-webui-lora-train: the only package that imports the WebUI's `modules`."""
