"""Core: errors, strict JSON reading, atomic and background writes, file checks, hub access,
logging to stderr and Ctrl-C handling.

The ground floor: plain Python over files and processes, importing nothing else of mlora's.
"""
