"""Chat with trained adapters in the browser: ``python inference.py --base_model M --dir D``."""

from mlora.cli.webui import main

if __name__ == "__main__":
    raise SystemExit(main())
