"""The order gateway: gRPC API for products, positions and NAV (services/gateway/main.py)."""
