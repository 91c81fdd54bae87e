"""Train many LoRA adapters at once: ``python mlora.py --base_model M --config C --dir D``."""

from mlora.cli.train import main

if __name__ == "__main__":
    raise SystemExit(main())
