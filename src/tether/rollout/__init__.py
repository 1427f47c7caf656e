"""Generation and scoring for online methods."""
