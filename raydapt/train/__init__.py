"""Training: pure tensor losses (losses.py), the Ray Train loop and FSDP2 wrapping."""
