"""The venue service: the simulated perpetual exchange behind gRPC (services/venue/main.py)."""
