"""Runnable demonstrations."""
