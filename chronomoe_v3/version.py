"""The package version (one place: __init__ re-exports it, the run manifest records it)."""

__version__ = "0.3.0.dev0"
