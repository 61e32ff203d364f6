"""edge-kit: train, quantize, sign and ship models to edge devices, and watch them for drift."""

__version__ = "0.1.0"
