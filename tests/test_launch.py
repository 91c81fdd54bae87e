"""launch.py: every verb through its real entry point, templates, and the offline quickstart."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mlora.cli import launch
from mlora.config.schema import load_config

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "dummy_data.json"
TEST_DATA = REPO / "data" / "dummy_test.json"
TEMPLATE_FILES = {
    p.stem: p for p in sorted((REPO / "mlora" / "adapters").glob("*/templates/*.json"))
}
TEMPLATES = sorted(TEMPLATE_FILES)


def launch_cli(cwd: Path, *args: str, home: Path) -> subprocess.CompletedProcess[str]:
    """``python launch.py ARGS`` as a user runs it: offline, demo model cached under ``home``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLORA_HOME": str(home)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, str(REPO / "launch.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def gen(tmp_path: Path, *args: str) -> int:
    return launch.main(["gen", "--file_name", str(tmp_path / "mlora.json"), *args])


def adapters(path: Path) -> list[dict]:
    return json.loads(path.read_text())["lora"]


# --- gen -----------------------------------------------------------------------------------


def test_the_required_templates_ship() -> None:
    assert {"lora", "dora", "rslora", "loraplus", "qlora"} <= set(TEMPLATES)


def test_each_template_lives_in_the_folder_of_the_kind_it_trains() -> None:
    """A template sits in ``mlora/adapters/KIND/templates/``: the kind its config selects in the
    registry is the one that folder's ``kind.py`` registers; no two kinds ship the same name."""
    import importlib

    from mlora.adapters.kinds import kind_for_config

    folders = [
        p.parent.parent.name for p in (REPO / "mlora" / "adapters").glob("*/templates/*.json")
    ]
    assert len(folders) == len(TEMPLATE_FILES)  # names are unique across kinds
    for name, path in TEMPLATE_FILES.items():
        kind = importlib.import_module(f"mlora.adapters.{path.parent.parent.name}.kind").KIND
        _, config, _ = launch.read_template(name, TEMPLATE_FILES)  # as gen reads it
        assert kind_for_config(config.lora[0]) is kind, name


@pytest.mark.parametrize("template", TEMPLATES)
def test_every_template_is_a_valid_config_and_gen_output_validates(
    template: str, tmp_path: Path
) -> None:
    load_config(TEMPLATE_FILES[template])
    assert gen(tmp_path, "--template", template, "--tasks", f"{DATA};{TEST_DATA}") == 0
    config = load_config(tmp_path / "mlora.json")
    assert [a.name for a in config.lora] == [f"{template}_0", f"{template}_1"]
    assert [a.data for a in config.lora] == [str(DATA), str(TEST_DATA)]


def test_gen_flags_land_on_their_config_keys(tmp_path: Path) -> None:
    flags = [
        "--prompt_template", "alpaca", "--cutoff_len", "128", "--save_step", "7",
        "--lr_scheduler", "cosine", "--warmup_steps", "3", "--learning_rate", "0.001",
        "--batch_size", "8", "--micro_batch_size", "4", "--num_epochs", "2",
        "--loraplus_lr_ratio", "4", "--use_dora", "--use_rslora", "--group_by_length",
    ]  # fmt: skip
    assert gen(tmp_path, "--template", "lora", "--tasks", str(DATA), *flags) == 0
    config = load_config(tmp_path / "mlora.json")
    assert (config.cutoff_len, config.save_step) == (128, 7)
    a = config.lora[0]
    assert (a.prompt, a.scheduler_type, a.warmup_steps, a.lr) == ("alpaca", "cosine", 3, 1e-3)
    assert (a.batch_size, a.micro_batch_size, a.num_epochs) == (8, 4, 2)
    assert (a.loraplus_lr_ratio, a.use_dora, a.use_rslora, a.group_by_length) == (4, 1, 1, 1)


def test_batch_size_alone_keeps_the_config_valid(tmp_path: Path) -> None:
    # The template's micro_batch_size (8) does not divide 4: gen must not write a broken config.
    assert gen(tmp_path, "--template", "lora", "--tasks", str(DATA), "--batch_size", "4") == 0
    assert load_config(tmp_path / "mlora.json").lora[0].micro_batch_size == 4


@pytest.mark.parametrize(
    ("tasks", "adapter_name", "names"),
    [
        (f"{DATA};{TEST_DATA}", "a;b", ["a", "b"]),
        (f"{DATA};{TEST_DATA}", "x", ["x_0", "x_1"]),
        (str(DATA), "solo", ["solo"]),
        (str(DATA), None, ["lora_0"]),
    ],
)
def test_adapter_names_from_a_list_a_prefix_or_a_single_name(
    tmp_path: Path, tasks: str, adapter_name: str | None, names: list[str]
) -> None:
    name_flag = ["--adapter_name", adapter_name] if adapter_name else []
    assert gen(tmp_path, "--template", "lora", "--tasks", tasks, *name_flag) == 0
    assert [a["name"] for a in adapters(tmp_path / "mlora.json")] == names


def test_built_in_choice_task_names_set_task_name(tmp_path: Path) -> None:
    from mlora.config.schema import CHOICE_TASK_NAMES, load_config

    tasks = ";".join([*CHOICE_TASK_NAMES, str(DATA)])
    assert gen(tmp_path, "--template", "lora", "--tasks", tasks) == 0
    config = load_config(tmp_path / "mlora.json")
    kinds = [(a.data, a.task_name) for a in config.lora]
    assert kinds == [*((t, t) for t in CHOICE_TASK_NAMES), (str(DATA), "casual")]


def test_append_keeps_existing_adapters_and_their_settings(tmp_path: Path) -> None:
    path = tmp_path / "mlora.json"
    assert gen(tmp_path, "--template", "lora", "--tasks", str(DATA), "--learning_rate", "1e-3") == 0
    before = adapters(path)
    assert gen(tmp_path, "--template", "dora", "--tasks", f"{DATA};{TEST_DATA}", "--append") == 0
    after = adapters(path)
    assert after[0] == before[0]
    assert [a["name"] for a in after] == ["lora_0", "dora_0", "dora_1"]
    assert after[1]["use_dora"] is True
    # Appending the same template again picks fresh names instead of duplicates.
    assert gen(tmp_path, "--template", "lora", "--tasks", str(DATA), "--append") == 0
    assert [a["name"] for a in adapters(path)][-1] == "lora_1"
    load_config(path)


def test_refuses_to_overwrite_an_existing_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "mlora.json"
    path.write_text("{}")
    assert gen(tmp_path, "--template", "lora", "--tasks", str(DATA)) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert path.read_text() == "{}"
    assert gen(tmp_path, "--template", "lora", "--tasks", str(DATA), "--overwrite") == 0
    load_config(path)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--template", "nope", "--tasks", str(DATA)], "unknown template 'nope'"),
        (["--template", "lora", "--tasks", "./missing.json"], "data file not found: ./missing"),
        (["--template", "lora", "--tasks", str(DATA), "--learning_rate", "-1"], "'lr' must be"),
        (["--template", "lora", "--tasks", f"{DATA};{DATA}", "--adapter_name", "a;b;c"], "3 names"),
    ],
)
def test_gen_user_errors_are_one_line_and_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert gen(tmp_path, *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert list(tmp_path.iterdir()) == []


def test_a_broken_template_file_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('{"lora": [{"name": "x", "data": "d.json", "rank": 4}]}')
    assert launch.main(["gen", "--template", str(broken), "--tasks", str(DATA),
                        "--file_name", str(tmp_path / "out.json")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "broken.json" in err and "'rank'" in err
    assert not (tmp_path / "out.json").exists()


def test_gen_errors_through_the_script_have_no_traceback(tmp_path: Path) -> None:
    result = launch_cli(
        tmp_path, "gen", "--template", "lora", "--tasks", "./nope.json", home=tmp_path / "home"
    )
    assert result.returncode == 2
    assert result.stderr == "error: data file not found: ./nope.json\n"
    assert not (tmp_path / "mlora.json").exists()


# --- run, avail, help ------------------------------------------------------------------------


def test_run_maps_its_flags_onto_mlora_py(tmp_path: Path) -> None:
    def mapped(*flags: str) -> str:
        return " ".join(launch.mlora_argv(launch.build_parser().parse_args(["run", *flags])))

    assert mapped(
        "--config", "c.json", "--dir", "out", "--seed", "3", "--dtype", "bf16", "--tf32",
        "--overwrite", "--load_adapter",
    ) == "--config c.json --dir out --seed 3 --load_adapter --overwrite --tf32 --bf16"  # fmt: skip
    assert mapped("--dtype", "fp32") == "--config mlora.json"
    assert mapped("--dtype", "fp16") == "--config mlora.json --fp16"


@pytest.mark.parametrize(
    "flags",
    [
        ["--dtype", "fp16", "--quantize", "4bit", "--attn_impl", "eager", "--device", "cpu",
         "--resume", "--trust_remote_code", "--tf32", "--overwrite", "--load_adapter"],
        ["--dtype", "bf16", "--quantize", "8bit", "--seed", "1", "--dir", "d"],
    ],
)  # fmt: skip
def test_every_mapped_run_flag_is_accepted_by_mlora_py(flags: list[str]) -> None:
    from mlora.cli.train import build_parser as mlora_parser

    argv = launch.mlora_argv(launch.build_parser().parse_args(["run", *flags]))
    parsed = mlora_parser().parse_args(["--base_model", "m", *argv])  # exits 2 on an unknown flag
    assert parsed.fp16 or parsed.bf16
    assert parsed.load_4bit or parsed.load_8bit


def test_evaluate_loads_the_base_model_like_run() -> None:
    flags = ["--dtype", "bf16", "--quantize", "8bit", "--attn_impl", "eager", "--device", "cpu"]
    run = launch.mlora_argv(launch.build_parser().parse_args(["run", *flags]))
    evaluate = launch.mlora_argv(launch.build_parser().parse_args(["evaluate", *flags]))
    assert evaluate == run and "--load_8bit" in evaluate and "--bf16" in evaluate


def test_run_missing_config_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert launch.main(["run", "--config", str(tmp_path / "none.json")]) == 2
    assert capsys.readouterr().err == f"error: config file not found: {tmp_path / 'none.json'}\n"


def test_run_passes_mlora_py_errors_and_exit_code_through(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"lora": [{"name": "a", "data": str(tmp_path / "gone.json")}]}))
    model = tmp_path / "no-model"
    code = launch.main(["run", "--config", str(config), "--base_model", str(model)])
    assert code == 2
    assert capsys.readouterr().err.strip().startswith("error: ")


def test_avail_lists_templates_prompts_and_data(capsys: pytest.CaptureFixture[str]) -> None:
    assert launch.main(["avail"]) == 0
    out = capsys.readouterr().out
    for name in TEMPLATES:
        assert re.search(rf"^  {re.escape(name)}\s", out, re.M), name
    assert "alpaca" in out and "dummy_data.json" in out and "4bit" in out


@pytest.mark.parametrize("argv", [["--help"], ["help"], ["gen", "--help"], ["run", "--help"],
                                  ["avail", "--help"], ["help", "run"]])  # fmt: skip
def test_every_verb_has_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert launch.main(argv) == 0
    assert "usage: launch.py" in capsys.readouterr().out


def test_console_script_points_at_main() -> None:
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["mlora-launch"] == "mlora.cli.launch:main"


def test_usage_errors_exit_2() -> None:
    assert launch.main(["fly"]) == 2
    assert launch.main(["gen", "--tasks", "x.json"]) == 2  # --template is required


# --- the README quickstart, end to end ---------------------------------------------------------


@pytest.mark.slow
def test_quickstart_offline_on_the_demo_model(tmp_path: Path) -> None:
    """``gen --template lora --tasks ./data/dummy_data.json`` then ``run``, as in the README.

    One epoch instead of the template's three keeps the test fast; everything else is as a
    user runs it: the real scripts, offline, with the demo model generated on first use.
    """
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    (tmp_path / "data").mkdir()
    shutil.copy(DATA, tmp_path / "data" / "dummy_data.json")
    home = tmp_path / "home"
    made = launch_cli(
        tmp_path, "gen", "--template", "lora", "--tasks", "./data/dummy_data.json",
        "--num_epochs", "1", home=home,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    ran = launch_cli(tmp_path, "run", home=home)
    assert ran.returncode == 0, ran.stderr
    assert "random-weight demo model (not a real LLM)" in ran.stderr
    losses = [float(x) for x in re.findall(r"\| loss ([0-9.]+) \|", ran.stderr)]
    assert len(losses) >= 2 and losses[-1] < losses[0] - 0.2, losses

    folder = tmp_path / "lora_0"
    assert (folder / "adapter_config.json").is_file()
    weights = load_file(folder / "adapter_model.safetensors")
    base = AutoModelForCausalLM.from_pretrained(home / "demo-model")
    peft_model = PeftModel.from_pretrained(base, folder)
    loaded = peft_model.state_dict()
    assert weights
    for key, tensor in weights.items():  # PEFT names the adapter "default" inside the model
        peft_key = re.sub(r"\.(lora_[AB])\.weight$", r".\1.default.weight", key)
        assert torch.equal(loaded[peft_key], tensor), key
    some_b = next(k for k in weights if k.endswith("lora_B.weight"))
    assert weights[some_b].abs().sum() > 0  # trained, not the zero init


@pytest.mark.parametrize("module", ["mlora.cli.launch", "mlora.cli.train", "mlora.cli.generate"])
def test_python_dash_m_runs_the_entry_point(module: str) -> None:
    """``python -m mlora.cli.launch`` (and the other two) run their command line, not nothing."""
    done = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.startswith("usage: "), done.stderr
