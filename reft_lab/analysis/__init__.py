"""Post-hoc analyses of finished jobs (``reft-lab analyze``)."""
