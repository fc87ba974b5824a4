"""`python -m benchmarks`: run every comparison and write the report (see run.py)."""

from benchmarks.run import main

main()
