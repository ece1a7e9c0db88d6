"""finetune: transfer learning for Hugging Face vision and text backbones on Accelerate."""

__version__ = "0.1.0"
