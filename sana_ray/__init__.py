"""sana-ray: declarative, Ray-based training for NVIDIA Sana text-to-image models."""

__version__ = "0.1.0"
