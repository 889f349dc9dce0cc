"""Measuring the product: `lmqa eval`, `lmqa bench` and the passkey test."""
