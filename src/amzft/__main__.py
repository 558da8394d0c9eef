"""``python -m amzft``: a tiny entry point; everything lives in amzft.cli."""

from amzft.cli import main

if __name__ == "__main__":
    main()
