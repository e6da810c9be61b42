"""Stand-in for backend/patcher: ModelPatcher and the LoRA loader."""
