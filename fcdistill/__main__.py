"""`python -m fcdistill ...` runs the `fcd` command line."""

from fcdistill.cli import main

if __name__ == "__main__":
    main()
