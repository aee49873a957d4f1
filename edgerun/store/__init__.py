"""The expert store: quantization formats, the on-disk layout, conversion from HF checkpoints."""
