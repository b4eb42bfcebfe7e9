"""Mixture-of-Recursions distributed pretraining."""
