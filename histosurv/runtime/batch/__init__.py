"""Batch scoring of slide archives."""
