"""`ld3m-fast convert CKPT OUT_DIR`: CompVis cin256-v2 checkpoint -> prior folder."""
from ..convert import add_convert_arguments as add_arguments
from ..convert import run_convert as run

__all__ = ["add_arguments", "run"]
