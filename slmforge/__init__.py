"""slmforge: choose, compare, quantize and QLoRA-fine-tune small language models."""

__version__ = "0.1.0"
