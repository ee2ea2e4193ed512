"""Synthetic utilities with ground truth, and the seeded measurement model of an AMI meter."""

from .generator import FeederSimulation, SynthResult, generate_utility, simulate_feeder
from .measurement import MeasurementModel, apply_measurement_model
from .scenarios import SCENARIOS, simulate_scenario, write_scenario

__all__ = [
    "SCENARIOS",
    "FeederSimulation",
    "MeasurementModel",
    "SynthResult",
    "apply_measurement_model",
    "generate_utility",
    "simulate_feeder",
    "simulate_scenario",
    "write_scenario",
]
