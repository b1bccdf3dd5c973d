"""`python -m bench`: validation loss, downstream accuracy, scaling-law fits and reports."""
from bench.cli import main

if __name__ == "__main__":
    main()
