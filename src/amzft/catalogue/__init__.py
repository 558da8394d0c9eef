"""``python -m amzft describe``: a description for every title of a catalogue file.

The file is read as a stream (``titles``), cut into batches of similar prompt lengths under a
token budget in a fixed plan (``plan``), answered by the fine-tuned model on one or several
processes through Lightning's predict loop (``run``), and written as batches finish to one
part file per process, which resume reads back and the end merges in input order (``store``).
"""
