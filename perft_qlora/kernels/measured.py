"""Measured backend table: where the Triton kernels beat the ``grouped`` backend on a GPU.

``auto`` on CUDA takes ``grouped`` unless an entry here says ``triton`` for the op, the GPU's compute
capability and the call's shape class (``dispatch.shape_class``). Entries come only from benchmark
runs: ``python -m perft_qlora.bench gpu-check --out DIR`` writes ``DIR/measured.py`` in this format
from its timings; review it and copy it over this file. Empty until such a run has been made.

Keys: ``(capability, op, shape class)``, e.g. ``("sm_90", "nf4_expert_mlp", "E64xH2048xI1024/large")``.
Values: ``"triton"`` or ``"grouped"``, with the measured milliseconds in a comment.
"""

MEASURED: dict[tuple[str, str, str], str] = {}
