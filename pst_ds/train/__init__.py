"""Training: the loop, the sparsity controller, optimizer groups, checkpoints, the memory model."""
