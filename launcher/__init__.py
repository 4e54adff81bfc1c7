"""qlaunch: distributed QLoRA/LoRA fine-tuning launcher."""

__version__ = "0.1.0"
