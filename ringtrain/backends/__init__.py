"""Training backends: how workers of one job talk to each other."""
