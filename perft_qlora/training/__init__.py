"""Training: data rows, the SFT trainer and its options, baselines, backends, the demo."""
