"""Stand-in for Forge's `modules` package: Forge keeps A1111's shell, so every module not defined here is the
A1111 stand-in's (tests/webui_standin/modules, appended to this package's path); `sd_models` and `processing`
are Forge's own (lazy engine loading; generation through the engine and its built-in LoRA loader)."""

import os

__path__.append(os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "webui_standin", "modules"))
