"""Fault injection against the real stack: bad input on every topic, kill -9 and restart
of every service mid-replay, broker and Redis restarts (`make chaos`, docs/reliability.md).
"""
