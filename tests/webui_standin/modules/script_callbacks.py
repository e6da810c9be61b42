"""Stand-in for modules/script_callbacks.py: the registrars an extension's scripts call, and their runners.

A1111 reports a failing callback and goes on; the stand-in lets the error through, so a test sees it.
"""

from __future__ import annotations

from collections import namedtuple
from typing import Any, Dict, List, Optional

ScriptCallback = namedtuple("ScriptCallback", ["script", "callback", "name"])

callback_map: Dict[str, List[ScriptCallback]] = {
    "callbacks_app_started": [],
    "callbacks_model_loaded": [],
    "callbacks_ui_tabs": [],
    "callbacks_ui_settings": [],
    "callbacks_script_unloaded": [],
}


def add_callback(callbacks, fun, *, name=None, category='unknown', filename=None):
    callbacks.append(ScriptCallback(filename or "unknown", fun, name or getattr(fun, "__name__", "unknown")))


def clear_callbacks():
    for callback_list in callback_map.values():
        callback_list.clear()


def app_started_callback(demo: Optional[Any], app) -> None:
    for c in callback_map["callbacks_app_started"]:
        c.callback(demo, app)


def model_loaded_callback(sd_model) -> None:
    for c in callback_map["callbacks_model_loaded"]:
        c.callback(sd_model)


def ui_tabs_callback() -> list:
    res = []
    for c in callback_map["callbacks_ui_tabs"]:
        res += c.callback() or []
    return res


def ui_settings_callback() -> None:
    for c in callback_map["callbacks_ui_settings"]:
        c.callback()


def script_unloaded_callback() -> None:
    for c in reversed(callback_map["callbacks_script_unloaded"]):
        c.callback()


def on_app_started(callback, *, name=None):
    """callback(demo: gr.Blocks | None, app: FastAPI), after the server starts (with or without --api)."""
    add_callback(callback_map["callbacks_app_started"], callback, name=name, category="app_started")


def on_model_loaded(callback, *, name=None):
    add_callback(callback_map["callbacks_model_loaded"], callback, name=name, category="model_loaded")


def on_ui_tabs(callback, *, name=None):
    """callback() -> [(gr.Blocks, title, elem_id), ...]"""
    add_callback(callback_map["callbacks_ui_tabs"], callback, name=name, category="ui_tabs")


def on_ui_settings(callback, *, name=None):
    add_callback(callback_map["callbacks_ui_settings"], callback, name=name, category="ui_settings")


def on_script_unloaded(callback, *, name=None):
    add_callback(callback_map["callbacks_script_unloaded"], callback, name=name, category="script_unloaded")
