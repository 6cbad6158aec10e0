"""A base model and an adapter as one Hugging Face folder (``python -m perft_qlora.export``)."""
