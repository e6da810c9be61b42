"""Stand-in for Forge's `backend` package: its layer classes, memory manager, engine, patchers and LoRA loader."""
