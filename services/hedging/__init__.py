"""The hedging execution service: leverage targets and orders -> netted venue trades
and the products' books (services/hedging/main.py)."""
