"""``python -m amzft``: a tiny entry point; everything lives in amzft.cli."""

import sys

from amzft.bootstrap import import_unsloth_if_wanted

if __name__ == "__main__":
    import_unsloth_if_wanted(sys.argv[1:])  # must precede transformers / peft / lightning

    from amzft.cli import main

    main()
