"""Integrations of mixprec with training frameworks (each imports its framework lazily: import
mixprec.integrations.lightning only where lightning is installed)."""
