"""Images -> patch features: backbone registry, weights, extractors, preprocessing."""
