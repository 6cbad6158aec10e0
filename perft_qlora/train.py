"""`python -m perft_qlora.train`: see perft_qlora/training/train.py."""

from .training.train import main

if __name__ == "__main__":
    main()
