"""Thin Ray Serve shells over the stage engines."""
