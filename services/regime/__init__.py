"""Regime detection: market.ticks -> market.regimes (docs/pipeline.md)."""
