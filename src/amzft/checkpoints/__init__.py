"""Checkpoints: atomic files, finding ``last`` / ``best``, adapter-only state, exact resume."""
