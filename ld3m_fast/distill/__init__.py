"""Distillation end to end: algorithms (DM, DC, MTT), expert buffers, the loop, evaluation.

Modules: `config` (every setting, declared once), `setup` (build and validate, write
nothing), `run` (the loop, checkpoints, signals), `export` (final/ and reading it
back), `runfolder` (lock, identity, leftovers), `iteration` (one iteration, shared
with the planner), `algorithms`, `buffers`, `evaluation`.
"""
from .algorithms import (DC, DM, MTT, Algorithm, NetworkSpec, RealData, StepContext, build_algorithm,
                         gradient_distance)
from .buffers import ExpertTrajectory, build_buffer, load_buffer
from .config import DistillConfig, load_config, resolve_defaults
from .evaluation import EvalConfig, evaluate_synthetic, format_report
from .export import load_final, save_image_grid
from .run import Distiller, Interrupted, resume_run, start_run
from .setup import Setup, build_setup, resolve_device

__all__ = [
    "DC", "DM", "MTT", "Algorithm", "DistillConfig", "Distiller", "EvalConfig", "ExpertTrajectory",
    "Interrupted", "NetworkSpec", "RealData", "Setup", "StepContext", "build_algorithm", "build_buffer",
    "build_setup", "evaluate_synthetic", "format_report", "gradient_distance", "load_buffer", "load_config",
    "load_final", "resolve_defaults", "resolve_device", "resume_run", "save_image_grid", "start_run",
]
