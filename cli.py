"""Entry point: `python cli.py --help`. The code lives in toolkit/cli.py."""

from toolkit.cli import main

if __name__ == "__main__":
    main()
