"""Reports on what factorisation buys: theoretical costs (costs.py)."""
