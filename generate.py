"""Answer prompts with trained adapters: ``python generate.py --base_model M --dir D "prompt"``."""

from mlora.cli.generate import main

if __name__ == "__main__":
    raise SystemExit(main())
