"""Evaluation of frozen features: ``metrics`` (what the training loop may import), ``common`` (what every
evaluation shares), then one module per protocol with its command line."""
