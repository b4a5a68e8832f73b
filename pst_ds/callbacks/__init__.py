"""What a pst-ds run does beyond a ``transformers.Trainer``'s loop, one callback per feature.

Any Trainer or TRL script gets a feature by passing its callback; ``PSTRun.callbacks()``
(integrations/hf.py) makes them all, in the order they must run.
"""
