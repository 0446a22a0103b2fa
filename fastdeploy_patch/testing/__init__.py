"""The multi-rank test harness: the rank launcher, the rank entry point and the GPU profile helper."""
