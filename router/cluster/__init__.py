"""The Redis Streams mode: many relay processes and hosts sharing one Redis.

Every key of a project carries the hash tag ``{project}`` (``keys.py``), so a
project's directory, streams and states live on one Redis shard and its Lua
scripts (``*.lua`` beside this file, loaded by ``scripts.py``) are atomic.
"""
