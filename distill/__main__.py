"""`python -m distill`: a student pre-trained on real + a teacher's synthetic tokens."""
from distill.cli import main

if __name__ == "__main__":
    main()
