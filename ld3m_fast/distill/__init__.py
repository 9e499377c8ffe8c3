"""Distillation end to end: algorithms (DM, DC, MTT), expert buffers, the loop, evaluation."""
from .algorithms import (DC, DM, MTT, Algorithm, NetworkSpec, RealData, StepContext, build_algorithm,
                         gradient_distance)
from .buffers import ExpertTrajectory, build_buffer, load_buffer
from .evaluation import EvalConfig, evaluate_synthetic, format_report
from .loop import DistillConfig, Distiller, build_setup, load_final, resume_run, start_run

__all__ = [
    "DC", "DM", "MTT", "Algorithm", "DistillConfig", "Distiller", "EvalConfig", "ExpertTrajectory",
    "NetworkSpec", "RealData", "StepContext", "build_algorithm", "build_buffer", "build_setup",
    "evaluate_synthetic", "format_report", "gradient_distance", "load_buffer", "load_final",
    "resume_run", "start_run",
]
