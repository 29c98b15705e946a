"""NAV accounting: marks every product's books (from `hedge.fills`) to market."""
