"""Run by the WebUI at start-up (not with --skip-install): installs what the extension needs and the WebUI's
venv lacks. Never installs or upgrades torch, torchvision, xformers, gradio or transformers."""

import launch

# (module to import, pip requirement): only packages the WebUI does not ship.
REQUIREMENTS = (
    ("tensorboard", "tensorboard==2.20.0"),  # TensorBoard event files of a run; 2.21 needs protobuf>=6.31
)

for module, requirement in REQUIREMENTS:
    if not launch.is_installed(module):
        launch.run_pip(f"install {requirement}", f"sd-webui-lora-train requirement: {requirement}")
