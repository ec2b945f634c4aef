"""Ray shells: rank and controller actors, placement, the command stream, the client handle."""
