"""lit_internvl: train InternVL-family vision-language models with PyTorch Lightning."""

__version__ = "0.1.0"
