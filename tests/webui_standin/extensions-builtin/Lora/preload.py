"""Stand-in for the built-in Lora extension's preload.py: --lora-dir and --lyco-dir-backcompat."""

import os

from modules import paths_internal


def preload(parser):
    parser.add_argument("--lora-dir", type=paths_internal.normalized_filepath,
                        help="Path to directory with Lora networks.",
                        default=os.path.join(paths_internal.models_path, "Lora"))
    parser.add_argument("--lyco-dir-backcompat", type=paths_internal.normalized_filepath,
                        default=os.path.join(paths_internal.models_path, "LyCORIS"))
