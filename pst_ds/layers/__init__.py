"""What the injector puts in a model: the shared bases, PST's layer and function, the baselines' layers."""
