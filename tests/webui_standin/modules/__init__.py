"""Stand-in for AUTOMATIC1111 WebUI 1.10's `modules` package: only what sd-webui-lora-train touches.

Written from the signatures and documented behaviour of A1111 1.10.1 (see DESIGN.md §4), not copied. Put on
sys.path by `webui_standin.installed()`, never importable in other tests.
"""
