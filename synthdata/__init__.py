"""synthdata/: mass generation of unconditional synthetic tokens from a teacher (see synthdata/job.py)."""
