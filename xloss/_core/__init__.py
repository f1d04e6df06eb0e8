"""Shared machinery: validation, layout, masking and reduction."""
