"""Train many LoRA adapters at once: ``python mlora.py --base_model M --config C --dir D``."""

from mlora.cli.train import main
from mlora.core.process_exit import exit_now

if __name__ == "__main__":
    exit_now(main())  # without the interpreter's slow teardown (mlora.core.process_exit)
