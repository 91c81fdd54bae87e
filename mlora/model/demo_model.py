"""The built-in demo base model: a tiny random-weight LLaMA, generated locally on first use.

It lets the quickstart run with no download and no GPU. It is a real transformer (LLaMA
architecture: RMSNorm, rotary positions, grouped-query attention, SwiGLU MLP) with *random*
weights, so it exercises every code path but knows no language — never mistake it for an LLM.

The model and its tokenizer are built deterministically (fixed seed, a byte-level BPE trained on
a corpus shipped inside the package), so every machine gets byte-identical files. They are cached
in ``$MLORA_HOME/demo-model`` (default ``~/.cache/mlora/demo-model``). The cache is written to a
temporary folder and renamed into place, so an interrupted first run never leaves a half-written
model and concurrent first runs are safe (one rename wins, the others discard their copy).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from mlora.core.content_cache import mlora_home
from mlora.core.errors import MloraError
from mlora.core.jsonfile import json_value

# Bump when anything below changes the generated files: an older cache is then rebuilt.
DEMO_MODEL_VERSION = 1
SEED = 1234
VOCAB_SIZE = 2048
SPECIAL_TOKENS = {
    "unk_token": "<unk>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "pad_token": "<pad>",
}
# Small enough for a CPU quickstart, big enough to be a real transformer (GQA: 2 KV heads for 8).
ARCHITECTURE = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
}
MARKER = "mlora-demo-model.json"

logger = logging.getLogger("mlora")


def demo_model_home() -> Path:
    """The cache folder: ``$MLORA_HOME/demo-model``, else ``~/.cache/mlora/demo-model``."""
    return mlora_home() / "demo-model"


def _is_current(path: Path) -> bool:
    marker, problem = json_value(path / MARKER)  # the one reader: a damaged marker is stale
    current = isinstance(marker, dict) and marker.get("version") == DEMO_MODEL_VERSION
    return problem is None and current


def _corpus() -> str:
    return resources.files("mlora.model").joinpath("resources/demo_corpus.txt").read_text("utf-8")


def build_tokenizer() -> object:
    """A byte-level BPE trained on the shipped corpus, wrapped as a transformers fast tokenizer.

    Byte-level means any text tokenizes (no unknown characters); BOS is prepended like LLaMA's.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus().split("\n\n"), trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        model_max_length=ARCHITECTURE["max_position_embeddings"],
        **SPECIAL_TOKENS,
    )


def build_demo_model(out_dir: str | Path) -> Path:
    """Write the demo model and tokenizer into ``out_dir`` (not atomic: see ``demo_model_path``).

    Returns:
        ``out_dir`` as a Path; ``AutoModelForCausalLM`` / ``AutoTokenizer`` load it.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),  # type: ignore[arg-type]
        bos_token_id=tokenizer.bos_token_id,  # type: ignore[attr-defined]
        eos_token_id=tokenizer.eos_token_id,  # type: ignore[attr-defined]
        pad_token_id=tokenizer.pad_token_id,  # type: ignore[attr-defined]
        **ARCHITECTURE,
    )
    # Seed a private generator state so building never disturbs (or depends on) the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config)
    from mlora.model.base_model import transformers_progress_bars_off

    with transformers_progress_bars_off():
        model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)  # type: ignore[attr-defined]
    # transformers 5 writes its own class name, which 4.x cannot load; both load this one.
    tok_config_path = out_dir / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text(encoding="utf-8"))
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_config_path.write_text(json.dumps(tok_config, indent=2) + "\n", encoding="utf-8")
    note = {"version": DEMO_MODEL_VERSION, "note": "random weights: a demo model, not a real LLM"}
    (out_dir / MARKER).write_text(json.dumps(note, indent=2) + "\n", encoding="utf-8")
    return out_dir


def demo_model_path() -> Path:
    """The cached demo model folder, generated on first use; logs that it is a demo model."""
    path = demo_model_home()
    if not _is_current(path):
        logger.warning("generating the built-in demo model (one time, a few seconds) in %s", path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".demo-model-", dir=path.parent))
        except OSError as exc:
            raise MloraError(
                f"cannot create the demo model cache {path} ({exc.strerror}); set MLORA_HOME"
            ) from None
        try:
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache is as readable as any other
            build_demo_model(tmp)
            _install(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    logger.warning("using the built-in random-weight demo model (not a real LLM) at %s", path)
    return path


def _install(tmp: Path, path: Path) -> None:
    """Rename a complete build into place; a stale cache is moved aside first."""
    if path.exists() and not _is_current(path):
        stale = Path(tempfile.mkdtemp(prefix=".demo-model-stale-", dir=path.parent))
        with contextlib.suppress(OSError):  # another process moved or replaced it first
            path.rename(stale / "old")
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp.rename(path)
    except OSError:
        if not _is_current(path):  # lost the race to a concurrent first run: theirs is as good
            raise
