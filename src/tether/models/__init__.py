"""Loading models and tokenizers, and running them for per-token log-probs."""
