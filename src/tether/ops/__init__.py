"""Pure tensor math with no trainer state."""
