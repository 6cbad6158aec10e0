"""perft_qlora: NF4 mixture-of-experts models with routed PEFT experts (PERFT) for single-GPU fine-tuning.

The re-exports below are imported on first use, so ``python -m perft_qlora.<command>`` can set up its
logging (``cli.py``) before torch, transformers and bitsandbytes are imported.
"""

from ._version import __version__ as __version__  # re-exported

_EXPORTS = {
    "ARCHITECTURES": "quant.arch", "UnsupportedArchitectureError": "quant.arch",
    "AdapterError": "method.checkpoint", "load_adapter": "method.checkpoint", "read_adapter_config": "method.checkpoint",
    "save_adapter": "method.checkpoint",
    "PerftConfig": "method.config",
    "Generator": "serving.generator",
    "load_model": "quant.loader",
    "perft_balance_loss": "method.losses",
    "memory_report": "quant.memory",
    "attach_perft": "method.model", "detach_perft": "method.model", "iter_perft_blocks": "method.model", "parameter_report": "method.model",
    "routing_stats": "method.stats",
}

__all__ = [
    "ARCHITECTURES", "AdapterError", "Generator", "PerftConfig", "UnsupportedArchitectureError", "attach_perft",
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
