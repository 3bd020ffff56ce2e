"""The pipeline stages: extract, score, evaluate, and the whole job."""
