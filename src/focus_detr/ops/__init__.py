"""Tensor operations with no learnable state (torch only)."""
