"""Reusable neural-network layers (depend on ops only)."""
