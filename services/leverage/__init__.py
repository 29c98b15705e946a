"""Leverage targeting: market.regimes -> leverage.targets (docs/pipeline.md)."""
