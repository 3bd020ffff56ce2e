"""Datasets: the MVTec AD layout (discovery, decoding, masks, hashing) and the demo generator."""
