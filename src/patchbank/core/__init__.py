"""Shared foundations: errors, device choice, atomic writes. Imports nothing else of patchbank."""
