"""``python -m amzft``: a tiny entry point; everything lives in amzft.cli.main."""

import sys

from amzft.cli.import_order import import_unsloth_if_wanted

if __name__ == "__main__":
    import_unsloth_if_wanted(sys.argv[1:])  # must precede transformers / peft / lightning

    from amzft.cli.main import main

    main()
