"""Merge methods (see ``registry.METHODS``) and the parts they are built from."""

from .registry import METHODS, ChunkResult, Method, get_method

__all__ = ["METHODS", "ChunkResult", "Method", "get_method"]
