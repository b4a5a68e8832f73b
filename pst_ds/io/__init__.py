"""Models, data, the cache, evaluation and the streaming export."""
