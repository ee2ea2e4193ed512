"""Synthetic utilities with ground truth, and the seeded measurement model of an AMI meter."""

from .measurement import MeasurementModel, apply_measurement_model

__all__ = ["MeasurementModel", "apply_measurement_model"]
