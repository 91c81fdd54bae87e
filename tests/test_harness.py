"""lm-evaluation-harness's ``--model mlora`` against the harness's own ``hf`` model (PEFT), and
against mlora's own forward for the kinds PEFT cannot load; the ``--harness`` commands.

Everything is offline: tasks are local YAML files over local JSON rows written here.
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import tomllib
import torch

pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from mlora.batching.layout import BatchLayout
from mlora.core.errors import MloraError
from mlora.inference.harness_model import MloraLM, load_session
from mlora.inference.harness_run import run_tasks
from mlora.inference.harness_tasks import PlannedTask
from mlora.inference.trained import load_trained
from tests.conftest import make_model, make_tokenizer
from tests.harness_support import (
    arc_rows,
    assert_same_answers,
    boolq_rows,
    moe_entry,
    requests,
    sample_answers,
    save_mlora_kind,
    save_peft_lora,
    write_tasks,
)
from tests.test_evaluation_cli import SCHEMA_CASES

ROOT = Path(__file__).resolve().parent.parent
TASKS = ["tiny_mc", "tiny_gen", "tiny_roll"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A saved tiny LLaMA, a PEFT LoRA and DoRA, MixLoRA / LoRAMoE / MoLA / MeteoRA adapters
    saved by mlora, and the three local tasks over 12 arc-style rows."""
    root = tmp_path_factory.mktemp("harness")
    tokenizer = make_tokenizer()
    base = make_model(vocab_size=len(tokenizer), seed=5)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    paths = {"base": root / "base", "root": root}
    paths["lora"] = save_peft_lora(base, root / "lora", seed=1)
    paths["dora"] = save_peft_lora(base, root / "dora", seed=2, dora=True)
    paths["lora2"] = save_peft_lora(base, root / "lora2", seed=6)
    for name, strategy in (("mixlora", "mixlora"), ("loramoe", "loramoe"), ("mola", "mola")):
        entry = moe_entry(name, strategy, **({"top_k": 2} if strategy != "loramoe" else {}))
        paths[name] = save_mlora_kind(root / "base", root / name, entry, seed=3)
    meteora = {
        "name": "meteora", "data": "unused.json", "routing_strategy": "meteora",
        "adapters": [str(paths["lora"]), str(paths["lora2"])],
    }  # fmt: skip
    paths["meteora"] = save_mlora_kind(root / "base", root / "meteora", meteora, seed=4)
    rows = root / "arc.json"
    rows.write_text(json.dumps(arc_rows(12)), encoding="utf-8")
    paths["tasks"] = write_tasks(root / "tasks", rows)
    return paths


@pytest.fixture
def local_tasks_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness's TaskManager without its thousands of built-in tasks (indexing them takes
    seconds per run; these tests use local tasks only)."""
    import lm_eval.tasks

    class LocalTaskManager(lm_eval.tasks.TaskManager):
        def __init__(self, *args: object, include_defaults: bool = True, **kwargs: object):
            super().__init__(*args, include_defaults=False, **kwargs)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", LocalTaskManager)


def _evaluate(model: object, tasks_dir: Path) -> dict:
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    return simple_evaluate(
        model=model, tasks=TASKS, task_manager=manager, log_samples=True, bootstrap_iters=0
    )


@pytest.mark.parametrize("adapter", ["lora", "dora"])
def test_mlora_model_equals_the_harness_hf_model_with_peft(
    setup: dict[str, Path], adapter: str
) -> None:
    """Same log-likelihoods (<= 1e-5), greedy flags, generations, acc / acc_norm / exact_match
    / perplexities on a multiple-choice, a generation and a rolling task."""
    hf = HFLM(
        pretrained=str(setup["base"]), peft=str(setup[adapter]), device="cpu", batch_size=4,
        dtype="float32",
    )  # fmt: skip
    theirs = _evaluate(hf, setup["tasks"])
    ours_lm = MloraLM(pretrained=str(setup["base"]), adapters=str(setup[adapter]), device="cpu")
    ours = _evaluate(ours_lm, setup["tasks"])
    for task in TASKS:
        assert_same_answers(sample_answers(ours, task), sample_answers(theirs, task))
        mine, reference = ours["results"][task], theirs["results"][task]
        for metric in ("acc,none", "acc_norm,none", "exact_match,none"):
            assert mine.get(metric) == reference.get(metric)
        for metric in ("word_perplexity,none", "bits_per_byte,none"):
            if metric in reference:
                assert mine[metric] == pytest.approx(reference[metric], rel=1e-5)
    assert ours["results"]["tiny_mc"]["acc,none"] > 0  # a task that says something


@pytest.mark.parametrize("batch_size", [1, 3])
def test_exact_mode_gives_the_hf_models_own_numbers(
    setup: dict[str, Path], batch_size: int
) -> None:
    """``exact=true`` computes in the hf model's shapes (its batches, padding, full-vocabulary
    log_softmax): every log-likelihood and rolling sum is the hf model's own, bit for bit."""
    hf = HFLM(
        pretrained=str(setup["base"]), peft=str(setup["lora"]), device="cpu",
        batch_size=batch_size, dtype="float32",
    )  # fmt: skip
    theirs = _evaluate(hf, setup["tasks"])
    ours_lm = MloraLM(
        pretrained=str(setup["base"]), adapters=f"a={setup['lora']};b={setup['dora']}",
        adapter="a", device="cpu", batch_size=batch_size, exact="true",
    )  # fmt: skip
    ours = _evaluate(ours_lm, setup["tasks"])
    for task in TASKS:
        assert sample_answers(ours, task) == sample_answers(theirs, task)
        assert ours["results"][task] == theirs["results"][task]


def _own_forward_loglikelihood(model, tokenizer, adapter: str, context: str, cont: str) -> float:
    """log p(cont | context) from ``MultiLoraModel.forward``'s full logits, one row alone."""
    whole = tokenizer(context + cont)["input_ids"]
    n = len(whole) - len(tokenizer(context)["input_ids"])
    ids = torch.tensor([whole])
    with torch.no_grad():
        logits = model(ids, torch.ones_like(ids), BatchLayout.from_row_adapters([adapter])).logits
    logprobs = torch.log_softmax(logits[0, :-1].double(), dim=-1)
    targets = ids[0, 1:]
    return float(logprobs[torch.arange(len(targets)), targets][-n:].sum())


def test_moe_kinds_equal_mloras_own_forward(setup: dict[str, Path]) -> None:
    """MixLoRA, LoRAMoE, MoLA and MeteoRA through ``--model mlora`` (several in one session):
    each log-likelihood equals mlora's own forward of that row with that adapter alone."""
    kinds = ["mixlora", "loramoe", "mola", "meteora"]
    adapters = ";".join(f"{k}={setup[k]}" for k in kinds)
    pairs = [("Question: what is 3?\nAnswer:", " 3"), ("a b c", " d e"), ("x", "yz 12")]
    reference, tokenizer = load_trained(str(setup["base"]), {k: setup[k] for k in kinds})
    session = None
    for kind in kinds:
        lm = MloraLM(pretrained=str(setup["base"]), adapters=adapters, adapter=kind, batch_size=2)
        if session is not None:
            lm = MloraLM(session=session, adapter=kind)
        session = lm.session
        answers = lm.loglikelihood(requests(*pairs))
        for (context, cont), (logprob, _) in zip(pairs, answers, strict=True):
            expected = _own_forward_loglikelihood(reference, tokenizer, kind, context, cont)
            assert logprob == pytest.approx(expected, abs=1e-5)
    exact = MloraLM(
        pretrained=str(setup["base"]), adapters=adapters, adapter="mixlora", exact=True,
        batch_size=2,
    )  # fmt: skip
    for kind in kinds:  # exact=true (padded batches, every kind at once) gives the same
        for (context, cont), (logprob, _) in zip(
            pairs, MloraLM(session=exact.session, adapter=kind).loglikelihood(requests(*pairs)),
            strict=True,
        ):  # fmt: skip
            expected = _own_forward_loglikelihood(reference, tokenizer, kind, context, cont)
            assert logprob == pytest.approx(expected, abs=1e-5)
    base_only = MloraLM(pretrained=str(setup["base"]))  # no adapters: the base alone
    (logprob, _), *_ = base_only.loglikelihood(requests(pairs[0]))
    assert logprob != pytest.approx(session.answers["mixlora"][("loglikelihood", *pairs[0])][0])


def test_several_adapters_in_one_run_equal_each_alone(setup: dict[str, Path]) -> None:
    """One session with four kinds: each adapter's harness results equal its own run, and the
    first run already answered every adapter's requests (shared batches)."""
    kinds = ["lora", "dora", "mixlora", "meteora"]
    planned = [PlannedTask(t, t) for t in TASKS]
    session = load_session(str(setup["base"]), {k: setup[k] for k in kinds}, batch_size=3)
    together = run_tasks(session, dict.fromkeys(kinds, planned), [str(setup["tasks"])])
    counts = {k: len(session.answers[k]) for k in kinds}
    assert len(set(counts.values())) == 1 and counts["lora"] > 0
    for kind in kinds:
        alone_session = load_session(str(setup["base"]), {kind: setup[kind]}, batch_size=5)
        alone = run_tasks(alone_session, {kind: planned}, [str(setup["tasks"])])[kind]
        for task in TASKS:
            ours, theirs = together[kind]["results"][task], alone["results"][task]
            for metric, value in theirs.items():
                if isinstance(value, float) and "perplexity" in metric:
                    assert ours[metric] == pytest.approx(value, rel=1e-5)
                else:
                    assert ours[metric] == value
        mine = session.answers[kind]
        keys = sorted(mine, key=str)
        assert_same_answers([mine[k] for k in keys], [alone_session.answers[kind][k] for k in keys])


def _config(root: Path, rows: dict[str, Path]) -> Path:
    adapters = [
        {"name": name, "task_name": task, "data": str(rows[key]), "test_data": str(rows[key])}
        for name, task, key in (("arc", "arc-e", "arc"), ("yesno", "boolq", "boolq"))
    ]
    path = root / "config.json"
    path.write_text(json.dumps({"cutoff_len": 64, "lora": adapters}), encoding="utf-8")
    return path


def _harness_task_over(root: Path, name: str, include: str, rows: list[dict]) -> None:
    """The test's own reference task: the harness's YAML over local rows (written here)."""
    import lm_eval.tasks

    data = root / f"{name}.json"
    data.write_text(json.dumps(rows), encoding="utf-8")
    config = {
        "include": str(Path(lm_eval.tasks.__file__).parent / include), "task": name, "tag": [],
        "dataset_path": "json", "dataset_name": None, "test_split": "test",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "training_split": None, "validation_split": None,
    }  # fmt: skip
    (root / f"{name}.yaml").write_text(json.dumps(config), encoding="utf-8")


def test_launch_evaluate_harness_gives_the_harness_tasks_on_the_same_rows(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``launch.py evaluate --harness arc-e,boolq``: each adapter is scored on its own rows by
    the harness's arc_easy / boolq, equal to the harness's hf model on those tasks and rows."""
    from mlora.cli.launch import main as launch

    base = make_model(vocab_size=len(make_tokenizer()), seed=5)
    out = tmp_path / "out"
    save_peft_lora(base, out / "arc", seed=7)
    save_peft_lora(base, out / "yesno", seed=8)
    arc, yesno = arc_rows(12), boolq_rows(10)
    rows = {"arc": tmp_path / "arc.json", "boolq": tmp_path / "boolq.json"}
    rows["arc"].write_text(json.dumps(arc), encoding="utf-8")
    rows["boolq"].write_text(json.dumps(yesno), encoding="utf-8")
    config = _config(tmp_path, rows)
    argv = ["evaluate", "--base_model", str(setup["base"]), "--config", str(config),
            "--dir", str(out), "--harness", "arc-e,boolq", "--device", "cpu"]  # fmt: skip
    assert launch(argv) == 0
    result = json.loads((out / "harness_result.json").read_text())
    assert set(result) == {"arc", "yesno"}
    assert "arc  " in capsys.readouterr().out  # the table
    reference = tmp_path / "reference"
    reference.mkdir()
    _harness_task_over(reference, "ref_arc", "arc/arc_easy.yaml", arc)
    super_glue = [{"passage": r["passage"], "question": r["question"], "label": int(r["answer"])}
                  for r in yesno]  # fmt: skip
    _harness_task_over(reference, "ref_boolq", "super_glue/boolq/default.yaml", super_glue)
    manager = TaskManager(include_path=str(reference), include_defaults=False)
    for adapter in ("arc", "yesno"):  # each adapter on both tasks' rows
        hf = HFLM(pretrained=str(setup["base"]), peft=str(out / adapter), device="cpu",
                  dtype="float32")  # fmt: skip
        theirs = simple_evaluate(
            model=hf, tasks=["ref_arc", "ref_boolq"], task_manager=manager, bootstrap_iters=0
        )["results"]
        for task, ref_task, source in (
            ("arc-e", "ref_arc", "arc"),
            ("boolq", "ref_boolq", "boolq"),
        ):
            ours = result[adapter]["results"][task]
            assert result[adapter]["tasks"][task]["rows"] == str(rows[source])
            for metric in ("acc,none", "acc_norm,none"):
                assert ours.get(metric) == theirs[ref_task].get(metric)
            assert ours["acc,none"] is not None


def test_harness_without_lm_eval_is_one_line(
    setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from mlora.cli.train import main

    rows = tmp_path / "arc.json"
    rows.write_text(json.dumps(arc_rows(2)), encoding="utf-8")
    config = _config(tmp_path, {"arc": rows, "boolq": rows})
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    argv = ["--base_model", str(setup["base"]), "--config", str(config), "--evaluate",
            "--harness", "arc-e"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: --harness needs lm-evaluation-harness: pip install 'mlora[eval]' (or lm-eval)"
    ]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--harness_limit", "2"], "--harness_limit needs --harness TASKS"),
        (["--harness", "arc-e", "--harness_limit", "0"], "--harness_limit must be > 0, got 0.0"),
        (["--harness", "arc-e", "--harness_fewshot", "-1"], "--harness_fewshot must be >= 0"),
        (["--harness", " , "], "--harness: name at least one task"),
        (
            ["--harness", "no_such_task_x", "--harness_include", "."],
            "unknown task 'no_such_task_x'",
        ),
        (
            ["--harness", "arc-e", "--harness_include", "/no/such/dir"],
            "--harness_include: no folder",
        ),
        (["--harness", "arc-e", "--adapters", "nope"], "unknown adapter 'nope'"),
        (["--harness", "arc-e", "WORLD_SIZE=2"], "--harness runs in one process"),
    ],
)
def test_bad_harness_options_are_one_line(
    setup: dict[str, Path],
    tmp_path: Path,
    capsys,
    extra: list[str],
    message: str,
    local_tasks_only: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mlora.cli.train import main

    rows = tmp_path / "arc.json"
    rows.write_text(json.dumps(arc_rows(2)), encoding="utf-8")
    config = _config(tmp_path, {"arc": rows, "boolq": rows})
    out = tmp_path / "out"
    base = make_model(vocab_size=len(make_tokenizer()), seed=5)
    save_peft_lora(base, out / "arc", seed=1)
    save_peft_lora(base, out / "yesno", seed=1)
    for item in [e for e in extra if "=" in e]:  # an environment variable, not a flag
        monkeypatch.setenv(*item.split("="))
    capsys.readouterr()  # what PEFT printed while saving (transformers' FutureWarnings) is not ours
    argv = ["--base_model", str(setup["base"]), "--config", str(config), "--evaluate",
            "--dir", str(out), *[e for e in extra if "=" not in e]]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_task_data_that_cannot_be_read_is_one_line_before_the_model(
    setup: dict[str, Path], tmp_path: Path, capsys
) -> None:
    from mlora.cli.train import main

    rows = tmp_path / "arc.json"
    rows.write_text(json.dumps(arc_rows(2)), encoding="utf-8")
    config = _config(tmp_path, {"arc": rows, "boolq": rows})
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    missing = {"task": "gone", "dataset_path": "json", "test_split": "test",
               "dataset_kwargs": {"data_files": {"test": str(tmp_path / "no.json")}},
               "output_type": "multiple_choice", "doc_to_text": "{{question}}",
               "doc_to_target": 0, "doc_to_choice": "{{choices.text}}"}  # fmt: skip
    (tasks / "gone.yaml").write_text(json.dumps(missing), encoding="utf-8")
    out = tmp_path / "out"
    base = make_model(vocab_size=len(make_tokenizer()), seed=5)
    save_peft_lora(base, out / "arc", seed=1)
    capsys.readouterr()  # what PEFT printed while saving (transformers' FutureWarnings) is not ours
    argv = ["--base_model", str(setup["base"]), "--config", str(config), "--evaluate",
            "--dir", str(out), "--adapters", "arc", "--harness", "gone",
            "--harness_include", str(tasks)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--harness: task data could not be loaded" in err[0], err
    assert not (out / "harness_result.json").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"adapters": "a=x;a=y"}, "adapter 'a' is given twice"),
        ({"adapters": "a.b=x"}, "adapter name 'a.b'"),
        ({"batch_size": "zero"}, "model_args batch_size: expected an integer >= 1"),
        ({"dtype": "int8"}, "model_args dtype"),
        ({"exact": "maybe"}, "model_args exact: expected true or false, got 'maybe'"),
        ({"bogus": "1"}, "model_args 'bogus' is not an argument of --model mlora"),
        ({}, "needs model_args pretrained"),
        ({"adapters": "a=x;b=y"}, "2 adapters .a, b. .* add adapter=NAME .* run mlora-lm-eval"),
    ],
)
def test_bad_model_args_are_one_line(args: dict, message: str) -> None:
    if args:
        args = {"pretrained": "unused", **args}
    with pytest.raises(MloraError, match=message):
        MloraLM(**args)


def test_plain_lm_eval_with_several_adapters_is_one_line(
    setup: dict[str, Path], tmp_path: Path
) -> None:
    """lm-eval's own ``lm_eval --model mlora`` (the model registered as its entry point would)
    with two adapters and no ``adapter``: one line naming adapter=NAME and mlora-lm-eval, exit
    2, no traceback, before any model loads."""
    import subprocess

    script = (
        "import sys, mlora.inference.harness_model\n"
        "from lm_eval.__main__ import cli_evaluate\n"
        "sys.argv[0] = 'lm_eval'\n"
        "cli_evaluate()\n"
    )
    model_args = f"pretrained={setup['base']},adapters=a={setup['lora']};b={tmp_path / 'none'}"
    done = subprocess.run(
        [sys.executable, "-c", script, "run", "--model", "mlora", "--model_args", model_args,
         "--tasks", "tiny_mc", "--include_path", str(setup["tasks"]), "--device", "cpu"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("error:")]
    assert "add adapter=NAME" in line and "mlora-lm-eval" in line


def test_registered_with_the_harness_and_as_an_entry_point() -> None:
    from lm_eval.api.registry import get_model

    assert get_model("mlora") is MloraLM
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    target = project["entry-points"]["lm_eval.models"]["mlora"]
    assert EntryPoint("mlora", target, "lm_eval.models").load() is MloraLM
    assert any(d.startswith("lm-eval") for d in project["optional-dependencies"]["eval"])


def test_mlora_lm_eval_command_reports_each_adapter(
    setup: dict[str, Path], tmp_path: Path, local_tasks_only: None
) -> None:
    """``mlora-lm-eval run --model mlora`` with two adapters: lm-eval's own CLI writes one
    result file per adapter, each with that adapter's scores."""
    from mlora.cli.harness import main

    out = tmp_path / "results"
    argv = ["run", "--model", "mlora", "--model_args",
            f"pretrained={setup['base']},adapters=lora={setup['lora']};moe={setup['mixlora']}",
            "--tasks", "tiny_mc", "--include_path", str(setup["tasks"]), "--device", "cpu",
            "--output_path", str(out)]  # fmt: skip
    assert main(argv) == 0
    scores = {}
    for name in ("lora", "moe"):
        files = list((out / name).rglob("results_*.json"))
        assert len(files) == 1, files
        result = json.loads(files[0].read_text())
        assert result["config"]["adapter"] == name
        scores[name] = result["results"]["tiny_mc"]["acc_norm,none"]
    session = load_session(str(setup["base"]), {"moe": setup["mixlora"]})
    alone = run_tasks(session, {"moe": [PlannedTask("tiny_mc", "tiny_mc")]}, [str(setup["tasks"])])
    assert scores["moe"] == alone["moe"]["results"]["tiny_mc"]["acc_norm,none"]


@pytest.mark.parametrize("task", sorted(SCHEMA_CASES))
def test_each_choice_task_reads_mloras_rows_as_mlora_does(task: str, tmp_path: Path) -> None:
    """Every mlora choice task, over a row of its schema, is the harness's task with the same
    choices and the same right answer as mlora's reader gives (winogrande: the harness's own
    partial sentences, its gold option from the same ``answer``)."""
    from mlora.config.schema import parse_config
    from mlora.inference.harness_tasks import plan_task

    row, expected = SCHEMA_CASES[task]
    variants = [row]
    if task == "hellaswag":  # rows with only ``ctx`` work too
        variants.append({k: v for k, v in row.items() if k not in ("ctx_a", "ctx_b")})
    if task == "winogrande":  # and answers as numbers
        variants.append({**row, "answer": 1})
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps(variants), encoding="utf-8")
    entry = {"name": "a", "task_name": task, "data": str(rows), "test_data": str(rows)}
    adapter = parse_config({"lora": [entry]}).lora[0]
    planned = plan_task(task, adapter, [adapter], tmp_path / "work")
    assert planned.rows == str(rows) and planned.harness.startswith("mlora_")
    manager = TaskManager(include_path=str(tmp_path / "work"), include_defaults=False)
    harness_task = manager.load([planned.harness])["tasks"][planned.harness]
    docs = list(harness_task.eval_docs)
    assert len(docs) == len(variants)
    for doc in docs:
        if task == "winogrande":
            assert harness_task.doc_to_text(doc) == expected.label
            continue
        assert harness_task.doc_to_choice(doc) == list(expected.choices)
        assert int(harness_task.doc_to_target(doc)) == expected.label
