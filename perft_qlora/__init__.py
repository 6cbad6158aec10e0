"""perft_qlora: NF4 mixture-of-experts models with routed PEFT experts (PERFT) for single-GPU fine-tuning.

The re-exports below are imported on first use, so ``python -m perft_qlora.<command>`` can set up its
logging (``cli.py``) before torch, transformers and bitsandbytes are imported.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "ARCHITECTURES": "arch", "UnsupportedArchitectureError": "arch",
    "AdapterError": "checkpoint", "load_adapter": "checkpoint", "read_adapter_config": "checkpoint",
    "save_adapter": "checkpoint",
    "PerftConfig": "config",
    "load_model": "loader",
    "perft_balance_loss": "losses",
    "memory_report": "memory",
    "attach_perft": "model", "detach_perft": "model", "iter_perft_blocks": "model", "parameter_report": "model",
    "routing_stats": "stats",
}

__all__ = [
    "ARCHITECTURES", "AdapterError", "PerftConfig", "UnsupportedArchitectureError", "attach_perft",
    "detach_perft", "iter_perft_blocks", "load_adapter", "load_model", "memory_report", "parameter_report",
    "perft_balance_loss", "read_adapter_config", "routing_stats", "save_adapter",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'perft_qlora' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
