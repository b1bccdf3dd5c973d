"""`python -m serve`: pack K members into one ensemble model; serve it with vLLM on Ray Serve."""
from serve.cli import main

if __name__ == "__main__":
    main()
