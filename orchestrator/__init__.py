"""Placeholder: this package lands with its issue."""
