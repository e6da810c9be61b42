"""Run by the WebUI at start-up (not with --skip-install): installs what the extension needs and the WebUI's
venv lacks, and the optional packages of the features the user picked (lora_train/extras.py: onnxruntime once
the WD14 tagger was chosen). Never installs or upgrades torch, torchvision, xformers, gradio or transformers."""

import launch

from lora_train.extras import requested_packages

# (module to import, pip requirement): only packages the WebUI does not ship.
REQUIREMENTS = (
    ("tensorboard", "tensorboard==2.20.0"),  # TensorBoard event files of a run; 2.21 needs protobuf>=6.31
    *requested_packages(),
)

for module, requirement in REQUIREMENTS:
    if not launch.is_installed(module):
        launch.run_pip(f"install {requirement}", f"sd-webui-lora-train requirement: {requirement}")
