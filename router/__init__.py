"""Relay Segment-spec analytics calls to Infinario."""
