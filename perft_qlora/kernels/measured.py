"""Measured backend table: which of the Triton kernels and the ``grouped`` backend won on a GPU.

An entry here for the op, the GPU's compute capability and the call's shape class
(``dispatch.shape_class``) overrides ``auto``'s default for that capability (``grouped`` where torch's
``grouped_mm`` is fused, sm_90 / sm_100; ``triton`` on sm_80 / sm_86 / sm_89, where it is a per-group
loop), as long as the named backend can take the call. Entries come only from benchmark
runs: ``python -m perft_qlora.bench gpu-check --out DIR`` writes ``DIR/measured.py`` in this format
from its timings; review it and copy it over this file. Empty until such a run has been made.

Keys: ``(capability, op, shape class)``, e.g. ``("sm_90", "nf4_expert_mlp", "E64xH2048xI1024/large")``.
Values: ``"triton"`` or ``"grouped"``, with the measured milliseconds in a comment.
"""

MEASURED: dict[tuple[str, str, str], str] = {}
