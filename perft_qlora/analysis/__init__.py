"""The look inside (python -m perft_qlora.analyze): router and expert geometry, routing of real tokens, report."""
