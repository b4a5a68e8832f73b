"""pst-ds inside other training loops (integrations/hf.py: transformers.Trainer)."""
