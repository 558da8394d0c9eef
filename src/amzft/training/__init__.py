"""What runs around the training loop: callbacks (in one stated order), validation schedule, and the one
module that touches Lightning's private internals (``lightning_compat``)."""
