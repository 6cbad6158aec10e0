"""Serving adapters: the app's model logic (chat.py) and generation in the recorded prompt template (generator.py,
``python -m perft_qlora.generate``)."""
