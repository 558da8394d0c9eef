"""Generation and the decoding options every answer uses."""
