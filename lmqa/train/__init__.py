"""Landmark fine-tuning: the training forward, text and QA training data."""
