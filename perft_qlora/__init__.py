"""perft_qlora: NF4 mixture-of-experts models with routed PEFT experts (PERFT) for single-GPU fine-tuning."""

__version__ = "0.1.0"

from .arch import ARCHITECTURES, UnsupportedArchitectureError  # noqa: E402
from .checkpoint import AdapterError, load_adapter, read_adapter_config, save_adapter  # noqa: E402
from .config import PerftConfig  # noqa: E402
from .loader import load_model  # noqa: E402
from .losses import perft_balance_loss  # noqa: E402
from .memory import memory_report  # noqa: E402
from .model import attach_perft, detach_perft, iter_perft_blocks, parameter_report  # noqa: E402
from .stats import routing_stats  # noqa: E402

__all__ = [
    "ARCHITECTURES", "AdapterError", "PerftConfig", "UnsupportedArchitectureError", "attach_perft",
    "detach_perft", "iter_perft_blocks", "load_adapter", "load_model", "memory_report", "parameter_report", "perft_balance_loss",
    "read_adapter_config", "routing_stats", "save_adapter",
]
