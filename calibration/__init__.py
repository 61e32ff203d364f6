"""Calibration data selection and streaming readers for int8 quantization."""
