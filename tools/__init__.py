"""Developer tools run from the checkout (not part of the wheel)."""
