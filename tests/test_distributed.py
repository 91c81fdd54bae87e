"""Data parallel training through the real launchers: ``launch.py run --nproc_per_node 2`` and
``torchrun --nproc_per_node 2 mlora.py`` (gloo, CPU).

The reference is the same CLI in one process on the same global batches: two processes must
save the same adapters (<= 1e-5), with dropout on, packed rows, gradient accumulation, DoRA, and
a step where rank 1 holds no row of an adapter. Then a SIGKILL of one rank and ``--resume``.
"""

from __future__ import annotations

import itertools
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mlora.batching.dispatcher import AdapterQueue, shard_bounds
from mlora.cli import train as cli
from mlora.data.rows import TokenizedRow
from mlora.training.distributed import Distributed
from tests.helpers import addition_rows, reverse_rows, write_json, write_template
from tests.reliability_support import (
    HARNESS,
    MLORA,
    ROOT,
    env_with,
    max_relative_difference,
    mlora_args,
)

NAMES = ("acc", "odd", "topk", "switch", "topp", "dense", "mola")


def write_config(folder: Path) -> Path:
    """``acc``: micro-batches of 2 rows (one per rank), 2 per optimizer step, ``lm_head`` among
    its targets, SGD; ``odd``: DoRA, 7 rows in steps of 3, so its last step has one row and rank 1
    none of it, AdamW (its state goes through the checkpoints). Dropout 0.2 on both, packed rows.
    Two processes sum the gradients in another order than one, and AdamW's first, near-sign steps
    blow such rounding in near-zero gradients up to its step size: ``acc`` under AdamW differed
    by 5e-4 between one and two processes after the dropout draws changed (2e-7 under SGD).
    ``pass_tokens`` 90 splits most steps into several passes (the same groups on every rank:
    they follow the whole micro-batches), so the router losses' cross-rank sums run once per
    pass."""
    folder.mkdir(parents=True, exist_ok=True)
    template = write_template(folder)
    config = {
        "cutoff_len": 40, "save_step": 2, "log_step": 1, "packing": True, "pass_tokens": 90,
        "lora": [
            {"name": "acc", "data": write_json(folder / "acc.json", addition_rows(10)),
             "prompt": template, "r": 4, "batch_size": 4, "micro_batch_size": 2,
             "num_epochs": 2, "lora_dropout": 0.2, "optim": "sgd", "lr": 1e-2,
             "target_modules": ["q_proj", "v_proj", "o_proj", "lm_head"],
             "test_data": write_json(folder / "acc-test.json", addition_rows(5, offset=1))},
            {"name": "odd", "data": write_json(folder / "odd.json", reverse_rows(7)),
             "prompt": template, "r": 2, "batch_size": 3, "num_epochs": 2, "use_dora": True,
             "lora_dropout": 0.2, "lr": 1e-2},
            *moe_adapters(folder, template),
        ],
    }  # fmt: skip
    path = folder / "config.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def moe_adapters(folder: Path, template: Path) -> list[dict]:
    """Mixture-of-experts adapters whose router losses are means over a micro-batch split over
    the ranks: MixLoRA top-k (router jitter, load-balancing loss, dropout on its attention
    LoRA), MixLoRA switch (a capacity that drops tokens, z-loss, FFN dropout), MixLoRA top-p
    (``mixlora-dynamic``: on the CPU its unused slots are dropped after a host read), LoRAMoE
    (expert dropout) and MoLA (load-balancing loss; 5 rows in micro-batches of 2, so rank 1
    holds no row of its last one). SGD: Adam would blow rounding in near-zero gradients up to
    its step size."""
    data = write_json(folder / "moe.json", addition_rows(6, offset=2))
    common = {
        "data": data,
        "prompt": template,
        "r": 2,
        "optim": "sgd",
        "lr": 0.2,
        "num_epochs": 1,
        "batch_size": 3,
        "lora_dropout": 0.2,
    }
    routed = {**common, "router_aux_loss_coef": 0.05, "num_experts": 3}
    return [  # expert dropout 0.2 everywhere (common): drawn token by token, exact
        {**routed, "name": "topk", "routing_strategy": "mixlora",
         "top_k": 2, "jitter_noise": 0.1,
         "target_modules": ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]},
        {**routed, "name": "switch", "routing_strategy": "mixlora-switch",
         "expert_capacity": 2, "ffn_dropout": 0.2, "router_z_loss_coef": 0.01,
         "target_modules": ["up_proj", "down_proj"]},
        {**routed, "name": "topp", "routing_strategy": "mixlora-dynamic", "top_p": 0.6,
         "target_modules": ["gate_proj", "up_proj", "down_proj"]},
        {**common, "name": "dense", "routing_strategy": "loramoe", "num_experts": 3,
         "target_modules": ["q_proj", "v_proj", "down_proj"]},
        {**routed, "name": "mola", "routing_strategy": "mola", "top_k": 2, "router_loss": True,
         "batch_size": 2,
         "data": write_json(folder / "mola.json", reverse_rows(5)),
         "target_modules": ["q_proj", "v_proj", "down_proj"]},
    ]  # fmt: skip


def torchrun(
    args: list[str], nproc: int = 2, script: str = MLORA, **env: str
) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node N SCRIPT ARGS``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", str(nproc), script, *args]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
        env={**env_with(**env), "OMP_NUM_THREADS": "1"},
    )


def torchrun_two_nodes(args: list[str]) -> list[subprocess.CompletedProcess]:
    """Two "nodes" on this machine: two ``torchrun --nnodes 2 --node_rank K --nproc_per_node 1
    --master_addr 127.0.0.1 --master_port P`` started side by side (the static rendezvous of a
    real two-machine run, see README), one process each."""
    with socket.socket() as probe:  # a free port for the master (node 0's store)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**env_with(), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"]
    command += ["--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port)]
    nodes = [
        subprocess.Popen(
            [*command, "--node_rank", str(rank), MLORA, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        for rank in (0, 1)
    ]
    done = []
    for node in nodes:
        out, err = node.communicate(timeout=240)
        done.append(subprocess.CompletedProcess(node.args, node.returncode, out, err))
    return done


def plain(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, MLORA, *args],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
        env=env_with(),
    )


def weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return {name: load_file(out / name / "adapter_model.safetensors") for name in NAMES}


@pytest.fixture(scope="module")
def runs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The same config trained by one process and by two."""
    folder = tmp_path_factory.mktemp("dist")
    config = write_config(folder)
    one = plain(mlora_args(tiny_model_dir, config, folder / "one"))
    assert one.returncode == 0, one.stderr
    launch = [sys.executable, str(ROOT / "launch.py"), "run", "--nproc_per_node", "2"]
    two = subprocess.run(  # launch.py starts torchrun with 2 processes of mlora.cli.train
        [*launch, *mlora_args(tiny_model_dir, config, folder / "two")],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
        env={**env_with(), "OMP_NUM_THREADS": "1"},
    )
    assert two.returncode == 0, two.stderr + two.stdout
    return {"folder": folder, "config": config, "one": folder / "one", "two": two}


def test_shards_are_disjoint_contiguous_and_cover_the_micro_batch() -> None:
    for count in range(0, 8):
        for world in (1, 2, 3):
            bounds = [shard_bounds(count, rank, world) for rank in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == count
            assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
            assert max(e - s for s, e in bounds) - min(e - s for s, e in bounds) <= 1


def test_the_config_has_a_step_where_rank_1_holds_no_row_of_an_adapter() -> None:
    rows = [TokenizedRow([1, 5, 2], [-100, 5, 2])] * 7
    queue = AdapterQueue("odd", rows, batch_size=3, micro_batch_size=3, num_epochs=1)
    shards = [queue.pop().shard(1, 2) for _ in range(queue.total_micro_batches)]
    assert [len(s.rows) for s in shards] == [1, 1, 0]


def test_two_processes_save_the_adapters_of_one(runs: dict) -> None:
    two = runs["two"]
    assert two.stderr.count("distributed: world size 2, backend gloo") == 1  # rank 0 only
    assert two.stderr.count("finished, saved to") == len(NAMES)  # rank 0 writes, once each
    diff = max_relative_difference(weights(runs["folder"] / "two"), weights(runs["one"]))
    assert diff <= 1e-5, diff


def test_fsdp_sharded_base_trains_the_adapters_of_one_process(
    runs: dict, tiny_model_dir: Path
) -> None:
    """``--fsdp`` (FSDP2 on gloo, CPU): rank 0 reads the base, rank 1 builds it on the meta
    device and receives its shards only; the adapters (DoRA included, whose init reads the
    base weight) are whole on both, and the saved adapters equal one process's. The probe
    (tests/reliability_harness.py) weighs each rank's parameter storage around the loading."""
    out, probe = runs["folder"] / "fsdp", runs["folder"] / "fsdp-probe"
    probe.mkdir()
    done = torchrun(
        mlora_args(tiny_model_dir, runs["config"], out, "--fsdp"),
        script=HARNESS,
        MLORA_TEST_FSDP_REPORT=str(probe),
    )
    assert done.returncode == 0, done.stderr
    assert "fsdp: the frozen base is sharded over 2 ranks (4 modules)" in done.stderr
    assert max_relative_difference(weights(out), weights(runs["one"])) <= 1e-5
    rank0, rank1 = (json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["before"] == rank0["full"] > 0  # rank 0 read the whole base
    assert rank1["before"] == 0  # rank 1 built it without memory
    # its shards: half of every tensor, rounded up to whole rows (the tiny model has no tied head)
    assert 0.45 * rank1["full"] <= rank1["after"] <= 0.55 * rank1["full"], rank1


@pytest.mark.gpu
def test_fsdp_on_gpus_trains_the_adapters_of_one_process(tiny_model_dir: Path, tmp_path) -> None:
    """The same on CUDA with nccl (one GPU per rank); needs 2 GPUs."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    config = write_config(tmp_path / "c")
    one = plain([*mlora_args(tiny_model_dir, config, tmp_path / "one")[:-2], "--device", "cuda"])
    assert one.returncode == 0, one.stderr
    args = mlora_args(tiny_model_dir, config, tmp_path / "two", "--fsdp")
    args[args.index("cpu")] = "cuda"
    two = torchrun(args)
    assert two.returncode == 0, two.stderr
    assert "backend nccl" in two.stderr
    assert max_relative_difference(weights(tmp_path / "two"), weights(tmp_path / "one")) <= 1e-4


def test_fsdp_without_several_processes_is_one_line(
    capsys, tiny_model_dir: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "c")
    assert cli.main(mlora_args(tiny_model_dir, config, tmp_path / "out", "--fsdp")) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --fsdp shards the base over several processes: start mlora.py with torchrun "
        "--nproc_per_node N (N > 1)"
    )


def test_killed_rank_then_resume_equals_the_uninterrupted_run(
    runs: dict, tiny_model_dir: Path
) -> None:
    """Rank 1 is SIGKILLed before global step 5 (mid accumulation of ``acc``); torchrun stops
    rank 0. ``--resume`` with 2 processes, and a copy with 1 process, end as the clean run.

    The resumed run is a two-node launch (two torchrun invocations, one process each, joined
    over 127.0.0.1): multi-node training saves the adapters of one process too."""
    folder, config = runs["folder"], runs["config"]
    cut = folder / "cut"
    killed = torchrun(
        mlora_args(tiny_model_dir, config, cut),
        script=HARNESS,
        MLORA_TEST_KILL="step:5",
        MLORA_TEST_KILL_RANK="1",
    )
    assert killed.returncode != 0
    assert not (cut / "acc" / "adapter_model.safetensors").exists()
    shutil.copytree(cut, folder / "cut-one")
    node0, node1 = torchrun_two_nodes(mlora_args(tiny_model_dir, config, cut, "--resume"))
    assert node0.returncode == node1.returncode == 0, node0.stderr + node1.stderr
    assert "resuming from" in node0.stderr
    assert "distributed: world size 2, backend gloo" in node0.stderr
    assert "finished, saved to" not in node1.stderr  # node 1 holds rank 1: it writes nothing
    clean = weights(folder / "two")
    assert max_relative_difference(weights(cut), clean) <= 1e-5
    assert max_relative_difference(weights(cut), weights(runs["one"])) <= 1e-5
    alone = plain(mlora_args(tiny_model_dir, config, folder / "cut-one", "--resume"))
    assert alone.returncode == 0, alone.stderr
    assert "resuming a run of 2 process(es) with 1" in alone.stderr
    assert max_relative_difference(weights(folder / "cut-one"), clean) <= 1e-5


def test_ranks_with_different_configs_stop_with_one_line(
    runs: dict, tiny_model_dir: Path, tmp_path: Path
) -> None:
    config = runs["config"]
    other = json.loads(config.read_text())
    other["lora"][0]["lr"] = 2e-2
    changed = tmp_path / "rank1.json"
    changed.write_text(json.dumps(other), encoding="utf-8")
    wrapper = tmp_path / "per_rank.py"  # rank 1 reads another config file
    wrapper.write_text(
        "import os, runpy, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        f"args = [{str(changed)!r} if a == {str(config)!r} and os.environ['RANK'] == '1' "
        "else a for a in sys.argv[1:]]\n"
        f"sys.argv = [{MLORA!r}, *args]\n"
        f"runpy.run_path({MLORA!r}, run_name='__main__')\n",
        encoding="utf-8",
    )
    result = torchrun(mlora_args(tiny_model_dir, config, tmp_path / "out"), script=str(wrapper))
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: rank 1 does not run the same training as rank 0: its config differ (every "
        "process must get the same command line, config and data files)"
    ], result.stderr
    assert not (tmp_path / "out" / "acc").exists()


def test_evaluation_shares_rows_and_rank_0_writes_the_results_of_one_process(
    runs: dict, tiny_model_dir: Path
) -> None:
    """``--evaluate`` under torchrun: 5 test rows over 2 ranks (3 + 2) give the figures and
    greedy answers of one process."""
    config = runs["config"]
    args = mlora_args(tiny_model_dir, config, runs["one"], "--evaluate", "--adapters", "acc")
    alone = plain(args)
    assert alone.returncode == 0, alone.stderr
    result = runs["one"] / "evaluate_result.json"
    want = json.loads(result.read_text())
    result.unlink()
    shared = torchrun(args)
    assert shared.returncode == 0, shared.stderr
    assert shared.stdout.count("exact_match") == 1  # the table, printed by rank 0 alone
    got = json.loads(result.read_text())
    assert got["acc"]["predictions"] == want["acc"]["predictions"]
    assert got["acc"]["rows"] == want["acc"]["rows"] == 5
    assert got["acc"]["loss"] == pytest.approx(want["acc"]["loss"], rel=1e-5)


def test_generation_shares_prompts_and_rank_0_writes_every_answer(
    runs: dict, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """``generate.py`` under torchrun: 5 prompts over 2 ranks, the answers in request order are
    ``generate``'s in this process (greedy)."""
    from mlora.inference.generation import GenerationRequest, SamplingParams, generate
    from mlora.inference.trained import load_trained

    prompts = [("add 1 2=", "acc"), ("rev cat=", "odd"), ("add 3 4=", "acc"), ("hi", None),
               ("rev owl=", "odd")]  # fmt: skip
    lines = [json.dumps({"prompt": p, "adapter": a}) for p, a in prompts]
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    folders = {name: runs["one"] / name for name in NAMES}
    args = ["--base_model", str(tiny_model_dir), "--device", "cpu", "--max_new_tokens", "6"]
    args += [f"--adapter={name}={folder}" for name, folder in folders.items()]
    args += ["--prompts_file", str(tmp_path / "prompts.jsonl")]
    args += ["--output", str(tmp_path / "out.jsonl")]
    done = torchrun(args, script=str(ROOT / "generate.py"))
    assert done.returncode == 0, done.stderr
    got = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    model, tokenizer = load_trained(str(tiny_model_dir), folders)
    want = generate(
        model,
        tokenizer,
        [GenerationRequest(p, a) for p, a in prompts],
        SamplingParams(max_new_tokens=6),
    )
    assert [(r["prompt"], r["adapter"], r["text"]) for r in got] == [
        (o.request.prompt, o.request.adapter, o.text) for o in want
    ]


def run_as_rank(monkeypatch, rank: int, argv: list[str]) -> int:
    """``mlora.py`` in this process as if torchrun had started it as ``rank`` of 2 (the checks
    under test come before the process group is joined)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    return cli.main(argv)


def test_world_size_larger_than_a_micro_batch_is_one_line(
    monkeypatch, capsys, tiny_model_dir: Path, tmp_path: Path
) -> None:
    config = json.loads(write_config(tmp_path / "c").read_text())
    config["lora"][0]["micro_batch_size"] = 1
    path = tmp_path / "small.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    argv = mlora_args(tiny_model_dir, path, tmp_path / "out")
    assert run_as_rank(monkeypatch, 0, argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: adapter 'acc': micro_batch_size 1 is smaller than the world size 2 (each "
        "process takes a share of every micro-batch); raise micro_batch_size to at least 2 or "
        "start fewer processes"
    )
    assert run_as_rank(monkeypatch, 1, argv) == 2  # the same error, printed by rank 0 alone
    assert "error:" not in capsys.readouterr().err


def test_fsdp_with_a_quantized_base_is_one_line(
    monkeypatch, capsys, tiny_model_dir: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "c")
    argv = mlora_args(tiny_model_dir, config, tmp_path / "out", "--fsdp", "--load_4bit")
    assert run_as_rank(monkeypatch, 0, argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --fsdp shards plain base weights, not a 4bit quantized base (--load_4bit): "
        "drop one of the two"
    )
    assert run_as_rank(monkeypatch, 1, argv) == 2  # the same error, printed by rank 0 alone
    assert "error:" not in capsys.readouterr().err
    assert not (tmp_path / "out" / "acc").exists()


def test_nccl_without_cuda_is_one_line(monkeypatch, capsys, tiny_model_dir: Path, tmp_path: Path):
    config = write_config(tmp_path / "c")
    argv = mlora_args(tiny_model_dir, config, tmp_path / "out", "--dist_backend", "nccl")
    assert run_as_rank(monkeypatch, 0, argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --dist_backend nccl needs CUDA devices, but this run uses cpu (use gloo, or "
        "run on GPUs)"
    )
    assert not (tmp_path / "out" / "acc").exists()


def test_one_process_needs_no_group() -> None:
    single = Distributed()
    tensors = [pytest.importorskip("torch").ones(2)]
    assert single.all_reduce_flat(tensors)[0] is tensors[0]
    assert single.any(True) and not single.any(False)


def test_router_sums_of_two_shares_give_the_load_balancing_loss_of_the_whole() -> None:
    """What each rank adds (its router sums under the summed counts) adds up, in value and in
    gradient, to transformers' Mixtral load-balancing loss of the whole micro-batch."""
    import torch
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from mlora.batching.aux_losses import RouterStats, router_loss

    experts, k = 4, 2
    logits = torch.randn(11, experts, generator=torch.Generator().manual_seed(3))
    whole_logits = logits.clone().requires_grad_(True)
    load_balancing_loss_func((whole_logits,), experts, k).backward()
    shared = logits.clone().requires_grad_(True)
    shares = []
    for part in (shared[:7], shared[7:]):  # rank 0's tokens, rank 1's
        probs = part.softmax(-1)
        chosen = torch.zeros_like(probs).scatter(1, probs.topk(k, dim=-1).indices, 1.0)
        shares.append(RouterStats.balance(probs, chosen, coef=float(experts)))
    counts = shares[0].counts + shares[1].counts  # the all_reduce
    total = sum(router_loss(s.values, counts, s.coefs) for s in shares)
    total.backward()
    want = load_balancing_loss_func((logits,), experts, k)
    assert total.item() == pytest.approx(want.item(), rel=1e-6)
    assert torch.allclose(shared.grad, whole_logits.grad, rtol=1e-5, atol=1e-8)


def test_moe_modules_are_found_for_router_sums(tmp_path: Path) -> None:
    """Which adapters record router sums under data parallel (one slot per MoE module, in
    model order)."""
    from mlora.config.schema import parse_config
    from mlora.model.multi_lora import MultiLoraModel
    from mlora.training.distributed import router_stat_slots
    from mlora.training.trainer import spec_from_config
    from tests.conftest import make_model, make_tokenizer

    adapters = moe_adapters(tmp_path, write_template(tmp_path))
    config = parse_config({"lora": adapters})
    model = MultiLoraModel(make_model(vocab_size=len(make_tokenizer())))  # 2 decoder layers
    for adapter in config.lora:
        model.add_adapter(adapter.name, spec_from_config(adapter))
    names = [adapter.name for adapter in config.lora]
    slots = router_stat_slots(model, names)
    # MixLoRA: a router per FFN; MoLA: a mixture per target (q, v, down) per layer; LoRAMoE has
    # no router loss
    assert {name: (len(ids), width) for name, (ids, width) in slots.items()} == {
        "topk": (2, 5), "switch": (2, 5), "topp": (2, 5), "mola": (6, 5),
    }  # fmt: skip


def test_router_sums_of_two_shares_give_the_z_loss_and_gate_loss_of_the_whole() -> None:
    """The switch z-loss (mean of logsumexp(logits)^2) and MeteoRA's gate loss (mean
    cross-entropy over the labelled tokens, some rows unlabelled) from two ranks' sums equal
    the whole micro-batch's, written directly, in value and gradient."""
    import torch
    import torch.nn.functional as F

    from mlora.batching.aux_losses import RouterStats, router_loss

    experts = 3
    logits = torch.randn(9, experts, generator=torch.Generator().manual_seed(5))
    tasks = torch.tensor([0, 2, -1, 1, 1, -1, -1, 0, 2])  # -1: no label
    whole = logits.clone().requires_grad_(True)
    labelled = tasks >= 0
    z_want = torch.logsumexp(whole, -1).pow(2).mean()
    gate_want = F.cross_entropy(whole[labelled], tasks[labelled])
    (0.1 * z_want + 0.3 * gate_want).backward()
    shared = logits.clone().requires_grad_(True)
    shares = []
    for part, part_tasks in ((shared[:4], tasks[:4]), (shared[4:], tasks[4:])):
        probs = part.softmax(-1)
        z = torch.logsumexp(part, -1).pow(2)
        shares.append(RouterStats.balance(probs, probs > 1.0, 0.0, z, 0.1))  # z only
        ce = F.cross_entropy(part, part_tasks.clamp_min(0), reduction="none")
        shares.append(RouterStats.gate(experts, ce, (part_tasks >= 0).float(), 0.3))
    z_counts = shares[0].counts + shares[2].counts  # the all_reduce, per module slot
    gate_counts = shares[1].counts + shares[3].counts
    total = sum(
        router_loss(s.values, z_counts if i % 2 == 0 else gate_counts, s.coefs)
        for i, s in enumerate(shares)
    )
    total.backward()
    assert total.item() == pytest.approx((0.1 * z_want + 0.3 * gate_want).item(), rel=1e-6)
    assert torch.allclose(shared.grad, whole.grad, rtol=1e-5, atol=1e-8)


def test_a_meteora_gate_records_router_sums_only_with_a_gate_loss() -> None:
    """The ``router_stat_experts`` hook of a MeteoRA gate: its adapters with a gate loss, none
    without (the MoE kinds' hooks are walked through a model in the test above)."""
    from mlora.adapters.meteora.layer import MeteoraAdapter

    gate = MeteoraAdapter(16, 12, [(2, 0.5), (4, 2.0), None], top_k=2)
    assert gate.router_stat_experts is None
    gate.gate_loss_weight = 0.25
    assert gate.router_stat_experts == 3
