"""Stand-in for modules/script_loading.py: loading a file as a module, running extensions' preload(parser)."""

import importlib.util
import os


def load_module(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def preload_extensions(extensions_dir, parser, extension_list=None):
    """Calls preload(parser) of every <extensions_dir>/<name>/preload.py, in name order.

    A1111 logs a failing preload and goes on; the stand-in lets the error through, so a test sees it.
    """
    if not os.path.isdir(extensions_dir):
        return
    for name in sorted(extension_list if extension_list is not None else os.listdir(extensions_dir)):
        script = os.path.join(extensions_dir, name, "preload.py")
        if os.path.isfile(script):
            module = load_module(script)
            if hasattr(module, "preload"):
                module.preload(parser)
