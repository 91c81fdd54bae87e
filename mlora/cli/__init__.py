"""Command lines: ``mlora`` (train), ``mlora-launch``, ``mlora-generate``, the chat loop and the
web page.

Each module parses flags and calls the library; none holds library code of its own.
"""
