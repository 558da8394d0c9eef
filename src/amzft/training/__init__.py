"""What runs around the training loop: the callbacks of a fit, in one stated order, and the validation schedule."""
