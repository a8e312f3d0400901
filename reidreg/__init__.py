"""reidreg."""
