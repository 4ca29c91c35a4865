"""Evaluation protocols on frozen features (kNN; linear probe and SVMs build on the same loaders)."""
