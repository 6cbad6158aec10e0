"""`python -m perft_qlora.analyze`: see perft_qlora/analysis/analyze.py."""

from .analysis.analyze import main

if __name__ == "__main__":
    main()
