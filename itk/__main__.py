"""`python -m itk` is `itk`: tests and benchmarks run the CLI this way, with the same interpreter."""

from itk.cli import main

main()
