"""Losses of the package's methods: plain functions on tensors, each testable against a naive loop."""
