"""Reinforcement-learning glue: clearing and reloading model weights between trainer updates."""
