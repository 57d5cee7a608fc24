"""Placeholder: filled by the cmff trainers."""

__all__: list[str] = []
