"""Exports of a study folder to the tools researchers watch runs in, after the fact."""
