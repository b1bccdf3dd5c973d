"""`python -m train`: corpus -> tokenizer and token shards -> regularized seed members; recipe search."""
from train.cli import main

if __name__ == "__main__":
    main()
