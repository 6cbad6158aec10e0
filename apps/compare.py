"""Chat with a base MoE model and its PERFT adapters side by side (Gradio): ``python apps/compare.py --demo``.

The app's code is ``perft_qlora/app.py`` (so an installed package carries it: ``perft-qlora app`` or
``python -m perft_qlora.app`` run the same thing from any directory); this file is its documented home in the
clone and runs it. ``python apps/compare.py --help`` lists the options.
"""

from perft_qlora.cli import quiet_library_notices

quiet_library_notices()  # before perft_qlora.app imports bitsandbytes, which logs its CPU-kernel notice then

from perft_qlora.app import *  # noqa: E402, F403  (build_demo, CompareApp, demo_paths, make_parser, ...: the tests' handle)
from perft_qlora.app import main  # noqa: E402

if __name__ == "__main__":
    main()
