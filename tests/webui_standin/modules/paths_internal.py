"""Stand-in for modules/paths_internal.py: user-data folders derived from --data-dir / --models-dir.

A1111 parses both from sys.argv (with $COMMANDLINE_ARGS appended) when first imported; the stand-in reads
$COMMANDLINE_ARGS only, because pytest owns sys.argv.
"""

import argparse
import os
import shlex
from pathlib import Path


def normalized_filepath(filepath):
    return str(Path(filepath).absolute())


commandline_args = shlex.split(os.environ.get("COMMANDLINE_ARGS", ""))

modules_path = os.path.dirname(os.path.realpath(__file__))
script_path = os.path.dirname(modules_path)

parser_pre = argparse.ArgumentParser(add_help=False)
parser_pre.add_argument("--data-dir", type=str, default=script_path)
parser_pre.add_argument("--models-dir", type=str, default=None)
cmd_opts_pre = parser_pre.parse_known_args(commandline_args)[0]

data_path = cmd_opts_pre.data_dir
models_path = cmd_opts_pre.models_dir or os.path.join(data_path, "models")
extensions_dir = os.path.join(data_path, "extensions")
extensions_builtin_dir = os.path.join(script_path, "extensions-builtin")
default_output_dir = os.path.join(data_path, "outputs")
