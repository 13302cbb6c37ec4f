"""Before/after evaluation: the task metric (``suite``) and the retention metrics (``retention``)."""
