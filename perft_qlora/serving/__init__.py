"""Serving adapters side by side (the app's model logic)."""
