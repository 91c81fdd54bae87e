"""``mlora-lm-eval`` / ``python -m mlora.cli.harness``: lm-evaluation-harness's own command
line with the model ``mlora`` registered, and one harness report per adapter.

lm-eval 0.4.13 finds models only in its own registry (later versions also read the
``lm_eval.models`` entry point that this package declares), so this command imports
``mlora.inference.harness_model`` (which registers ``--model mlora``) and then runs lm-eval's
CLI unchanged: every lm-eval option works as documented by lm-eval.

``--model mlora`` with several ``adapters`` and no ``adapter``: the harness reports one model
per run, so the run is made once per adapter (``adapter=NAME`` added to the model arguments,
``--output_path`` and ``--use_cache`` suffixed with the adapter's name). The model loads once;
the first run's requests are answered by every adapter in the same batches, and the later runs
find their answers ready.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from mlora.core.errors import exit_code_of


def _per_adapter(args: argparse.Namespace) -> list[argparse.Namespace]:
    """One namespace per adapter for ``--model mlora`` with several adapters, else ``[args]``."""
    from mlora.inference.harness_model import MODEL_NAME, parse_adapters

    model_args = getattr(args, "model_args", None)
    if getattr(args, "command", None) != "run" or getattr(args, "model", None) != MODEL_NAME:
        return [args]
    if not isinstance(model_args, dict) or model_args.get("adapter"):
        return [args]
    names = list(parse_adapters(model_args.get("adapters")))
    if len(names) < 2:
        return [args]
    runs = []
    for name in names:
        run = argparse.Namespace(**vars(args))
        run.model_args = {**model_args, "adapter": name}
        if getattr(args, "output_path", None):
            run.output_path = str(Path(args.output_path) / name)
        if getattr(args, "use_cache", None):
            run.use_cache = f"{args.use_cache}_{name}"  # its keys do not name the adapter
        runs.append(run)
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (2 with one line when lm-eval is missing)."""

    def run() -> int:
        from mlora.inference.harness_run import require_lm_eval

        require_lm_eval("mlora-lm-eval")
        from lm_eval._cli import HarnessCLI
        from lm_eval.utils import setup_logging

        from mlora.inference.harness_model import share_sessions

        setup_logging()
        parser = HarnessCLI()
        given = list(sys.argv[1:] if argv is None else argv)
        saved = sys.argv
        sys.argv = ["lm-eval", *given]  # lm-eval's parser reads sys.argv
        try:
            args = parser.parse_args()
        finally:
            sys.argv = saved
        with share_sessions():
            for one in _per_adapter(args):
                parser.execute(one)
        return 0

    return exit_code_of(run)


if __name__ == "__main__":
    sys.exit(main())
