"""Tasks (built-in and custom), their scoring, and the retention prompt sets."""
