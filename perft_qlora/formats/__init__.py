"""The LLM-Adapters row format shared by training and evaluation: rows, prompt templates, the demo data."""
