"""`ld3m-fast info`: versions, devices, and which backend each op will use."""
from __future__ import annotations

import importlib
import json
import os
import platform


def add_arguments(parser):
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _version(module_name: str) -> str:
    try:
        return importlib.import_module(module_name).__version__
    except ImportError:
        return "not installed"
    except Exception as error:  # a broken optional install (e.g. xformers without CUDA)
        return f"unusable ({type(error).__name__})"


def collect() -> dict:
    import torch

    from .. import __version__, ops

    devices = {"cpu": f"{platform.processor() or platform.machine()}, "
                      f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}"}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            devices[f"cuda:{i}"] = torch.cuda.get_device_name(i)
    else:
        devices["cuda"] = "not available"
    return {
        "versions": {
            "ld3m_fast": __version__, "python": platform.python_version(),
            "torch": torch.__version__, "diffusers": _version("diffusers"),
            "safetensors": _version("safetensors"), "triton": _version("triton"),
            "xformers": _version("xformers"), "numpy": _version("numpy"),
        },
        "devices": devices,
        "environment": {k: os.environ[k] for k in
                        ("LD3M_FAST_BACKEND", "LD3M_FAST_JIT", "TORCH_EXTENSIONS_DIR", "CXX",
                         "TRITON_INTERPRET", "HF_HUB_OFFLINE")
                        if k in os.environ},
        "ops": ops.backend_report(),
    }


def run(args) -> int:
    report = collect()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for section, values in report.items():
        print(f"{section}:")
        if not values:
            print("  (none)")
        for key, value in values.items():
            print(f"  {key:<24} {value}")
    return 0
