"""Placeholder: filled by the utad trainers."""

__all__: list[str] = []
