"""`python -m perft_qlora.evaluate`: see perft_qlora/evaluation/evaluate.py."""

from .evaluation.evaluate import main

if __name__ == "__main__":
    main()
