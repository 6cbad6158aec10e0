"""The LLM-Adapters row format shared by training and evaluation: rows, prompt templates, chat templates, the demo
data."""
