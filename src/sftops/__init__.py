"""sftops: supervised fine-tuning of causal language models, from raw data to a registered model."""

__version__ = "0.1.0"
