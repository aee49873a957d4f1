"""Reading model checkpoints: weights, configuration and tokenizer files."""
