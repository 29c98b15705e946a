"""Price ingestion: real-history replay, synthetic stress paths or a live exchange feed,
validated, sequenced per symbol and published to `market.ticks` (docs/pipeline.md)."""
