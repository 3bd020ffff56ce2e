"""On-disk formats between stages: feature banks, the decoded-image cache, score runs."""
