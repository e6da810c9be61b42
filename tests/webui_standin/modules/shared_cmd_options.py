"""Stand-in for modules/shared_cmd_options.py: cmd_opts, after every extension's preload() added its flags."""

from modules import cmd_args, script_loading
from modules.paths_internal import commandline_args, extensions_builtin_dir, extensions_dir

parser = cmd_args.parser

script_loading.preload_extensions(extensions_dir, parser)
script_loading.preload_extensions(extensions_builtin_dir, parser)

cmd_opts = parser.parse_args(commandline_args)
