"""`python -m perft_qlora.plan`: see perft_qlora/quant/plan.py."""

from .quant.plan import main

if __name__ == "__main__":
    main()
