"""distill/: student pre-training on a real + synthetic token mixture (see distill/student.py)."""
