"""``python -m amzft describe``: a description for every title of a catalogue file, read as a stream
(``titles``), batched in a fixed plan (``plan``), answered on Lightning's predict loop (``run``) and
written as batches finish, resumably (``store``)."""
