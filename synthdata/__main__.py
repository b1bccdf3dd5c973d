"""`python -m synthdata`: a teacher's unconditional samples, as resumable exactly-once Parquet shards."""
from synthdata.cli import main

if __name__ == "__main__":
    main()
