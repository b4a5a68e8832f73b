"""Masks: exact selection, the mask kinds and their registry, learned thresholds' global split."""
