"""Stand-in for modules/cmd_args.py: the WebUI's own command-line flags that this extension reads."""

import argparse

from modules.paths_internal import data_path, normalized_filepath

parser = argparse.ArgumentParser()
parser.add_argument("--data-dir", type=normalized_filepath, default=data_path)
parser.add_argument("--models-dir", type=normalized_filepath, default=None)
parser.add_argument("--no-half", action="store_true")
parser.add_argument("--medvram", action="store_true")
parser.add_argument("--lowvram", action="store_true")
parser.add_argument("--api", action="store_true")
parser.add_argument("--api-auth", type=str, default=None)
parser.add_argument("--skip-install", action="store_true")
