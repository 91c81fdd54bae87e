"""Write a config from a template and run it: ``python launch.py gen|run|avail|help``."""

from mlora.cli.launch import main

if __name__ == "__main__":
    raise SystemExit(main())
