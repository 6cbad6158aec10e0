"""Evaluation: task table, protocols, prompts, answer extraction, generation, predictions and summaries."""
