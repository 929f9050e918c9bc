"""Scale-out: DDP / FSDP-of-the-target on 2 CPU processes (gloo), Slurm detection and SIGUSR1
checkpoint + requeue, exact resume after SIGKILL, corrupt-checkpoint fallback, the resumable sampler.

Every training run is a subprocess (`tests/launch.py`) pinned to one thread per process, a few steps
of the tiny workspace model. Measured on 2 CPU cores (torch 2.13): 2-process DDP vs 1 process with the
same global batch, 3 distillation steps: max |Δw| 6.3e-7 (DDP via Lightning's launcher and FSDP via
torchrun alike; the 3 steps move the weights by up to 4.0e-3); 2 maml meta-training steps: max |Δw|
4.5e-8 (LoRA B moves 1.5e-3 from 0). SIGKILL + resume, and corrupt last.ckpt + fallback: bitwise equal.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import recipe_args
from launch import REPO, clean_env, exported_weights, max_abs_diff, metattt_command, run_metattt

from metattt.checkpointing import (
    PREEMPTED_EXIT_CODE,
    AtomicCheckpointIO,
    ResumableDataLoader,
    ResumableSampler,
    checkpoint_is_loadable,
    find_resumable_checkpoint,
)

DDP_ATOL = 5e-6  # 1 process vs 2: only the order of float sums differs (measured ≤ 6.3e-7)

# Equivalence runs pick every valid anchor (num_anchors ≥ sequence length) and a fixed context
# length, so the random draws — which are seeded per rank — select the same blocks however the
# global batch is split; what is compared is then exactly the gradient synchronisation.
DISTILL_EQ = ["--distill.num_anchors=64", "--distill.max_steps=3", "--distill.val_check_interval=100",
              "--distill.limit_val_batches=0", "--data.batch_size=8"]
META_EQ = ["--meta.algorithm=maml", "--meta.ttt.steps=2", "--meta.context_min=20", "--meta.context_max=20",
           "--meta.ttt.num_anchors=64", "--meta.outer_anchors=64", "--meta.max_steps=2", "--meta.limit_val_batches=0",
           "--meta.inner_lr_warmup_steps=0", "--meta.warmup_ratio=0", "--lora.r=4", "--lora.alpha=8",
           "--data.batch_size=4"]


def _args(ws: Path, out: Path, *extra: str) -> list[str]:
    return recipe_args(ws, f"--run.output_root={out}", *extra)


def _half_batch(args: list[str], key: str = "--data.batch_size=") -> list[str]:
    """The same recipe with the per-device batch halved (2 processes → the same global batch)."""
    out = []
    for a in args:
        out.append(f"{key}{int(a[len(key):]) // 2}" if a.startswith(key) else a)
    return out


@pytest.fixture(scope="module")
def distill_1proc(workspace, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("d1")
    run_metattt("distill", _args(workspace, out, *DISTILL_EQ))
    return out / "t"


@pytest.mark.e2e
@pytest.mark.parametrize(("strategy", "launcher"), [("ddp", "lightning"), ("fsdp", "torchrun")])
def test_distill_two_processes_match_one(workspace, tmp_path, distill_1proc, strategy, launcher):
    """ddp: Lightning's own launcher re-executes the command for rank 1. fsdp (the target's decoder
    layers sharded with FSDP2, the drafter on DDP): under torchrun (TorchElasticEnvironment)."""
    proc = run_metattt("distill", _args(workspace, tmp_path, *_half_batch(DISTILL_EQ)), devices=2, strategy=strategy,
                       launcher=launcher)
    if strategy == "fsdp":  # both ranks sharded the target's 4 decoder layers (FSDP2 over gloo)
        assert proc.stderr.count("fsdp: target sharded over 2 ranks, 4 units of ['Qwen3DecoderLayer']") == 2
    ref, two = exported_weights(distill_1proc / "drafter"), exported_weights(tmp_path / "t" / "drafter")
    ckpt = torch.load(tmp_path / "t" / "distill" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 3 and not any(k.startswith("target.") for k in ckpt["state_dict"])
    assert ckpt["metattt_data"]["num_replicas"] == 2 and ckpt["metattt_data"]["samples_seen"] == 24
    init_ckpt = torch.load(distill_1proc / "distill" / "checkpoints" / "last.ckpt", weights_only=False)
    assert init_ckpt["metattt_data"]["samples_seen"] == 24  # 3 steps × 8 sequences, either way
    assert max_abs_diff(ref, two) < DDP_ATOL


@pytest.mark.e2e
def test_maml_two_processes_match_one(workspace, tmp_path, distill_1proc):
    """Second-order meta-training: the inner autograd.grad(create_graph=True) inside training_step,
    the outer manual_backward synchronised by DDP, equals one process with the whole batch."""
    args = [*META_EQ, f"--meta.drafter_path={distill_1proc / 'drafter'}"]
    run_metattt("meta-train", _args(workspace, tmp_path / "one", *args))
    run_metattt("meta-train", _args(workspace, tmp_path / "two", *_half_batch(args)), devices=2)
    one = exported_weights(tmp_path / "one" / "t" / "meta_lora")
    two = exported_weights(tmp_path / "two" / "t" / "meta_lora")
    moved = max(v.abs().max().item() for k, v in one.items() if "lora_B" in k)  # B starts at 0
    assert moved > 1e-4, "the meta-update did not move the LoRA init: the comparison would be empty"
    assert max_abs_diff(one, two) < DDP_ATOL


# --- Slurm ---------------------------------------------------------------------------------------

SLURM_ENV = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "metattt-test", "SLURM_NTASKS": "1",
             "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
             "SLURM_NNODES": "1", "SLURM_NODELIST": "localhost"}


def _trainer(tmp_path: Path, **trainer_kw):
    from metattt.config import RunConfig, TrainerConfig
    from metattt.lit.trainer import make_trainer

    return make_trainer(RunConfig(output_root=str(tmp_path)), TrainerConfig(accelerator="cpu", **trainer_kw), "x",
                        max_epochs=1, max_steps=1, grad_clip=None, checkpoint_every_n_steps=1)


@pytest.mark.e2e
def test_slurm_and_torchrun_environments_are_detected(monkeypatch, tmp_path):
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
    from lightning.fabric.utilities import rank_zero as fabric_rank_zero
    from lightning.pytorch.utilities import rank_zero

    from metattt.distributed import TargetAwareDDPStrategy

    for mod in (rank_zero, fabric_rank_zero):  # building a Trainer sets the process-wide rank: restore it after
        monkeypatch.setattr(mod.rank_zero_only, "rank", getattr(mod.rank_zero_only, "rank", 0))
    for k in [k for k in os.environ if k.startswith(("SLURM_", "TORCHELASTIC_"))] + ["MASTER_ADDR", "MASTER_PORT"]:
        monkeypatch.setenv(k, "")  # records the original value (or its absence) for the undo
        monkeypatch.delenv(k)
    assert not SLURMEnvironment.detect()
    env = {**SLURM_ENV, "SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "2",
           "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_NODELIST": "node[07-08]"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert SLURMEnvironment.detect()
    trainer = _trainer(tmp_path, devices=2, num_nodes=2, strategy="ddp")
    cluster = trainer.strategy.cluster_environment
    assert isinstance(trainer.strategy, TargetAwareDDPStrategy) and isinstance(cluster, SLURMEnvironment)
    assert not cluster.auto_requeue  # metattt's PreemptionCheckpoint handles SIGUSR1 instead
    assert (trainer.world_size, trainer.global_rank, trainer.local_rank, trainer.node_rank) == (4, 3, 1, 1)
    assert cluster.main_address == "node07"
    # torchrun inside a Slurm allocation: TorchElastic wins (Lightning's priority), no Slurm plugin
    for k, v in {"TORCHELASTIC_RUN_ID": "x", "RANK": "1", "LOCAL_RANK": "1", "GROUP_RANK": "0", "WORLD_SIZE": "2",
                 "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}.items():
        monkeypatch.setenv(k, v)
    assert TorchElasticEnvironment.detect()
    trainer = _trainer(tmp_path, devices=2, strategy="auto")
    assert isinstance(trainer.strategy, TargetAwareDDPStrategy)  # auto with 2 devices → metattt's ddp
    assert isinstance(trainer.strategy.cluster_environment, TorchElasticEnvironment)
    assert trainer.global_rank == 1


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while text not in (path.read_text() if path.exists() else ""):
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {text!r}:\n{path.read_text()[-4000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"no {text!r} after {timeout} s")
        time.sleep(0.1)


@pytest.mark.e2e
def test_sigusr1_checkpoints_requeues_and_the_restart_resumes(workspace, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    scontrol.chmod(0o755)
    env = {**SLURM_ENV, "PATH": f"{bin_dir}:{clean_env()['PATH']}"}
    common = ["--distill.checkpoint_every_n_steps=100000", "--distill.val_check_interval=100000",
              "--distill.max_epochs=1000"]
    log = tmp_path / "job1.log"
    cmd = metattt_command("distill", _args(workspace, tmp_path, *common, "--distill.max_steps=100000"))
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=clean_env(env), stdout=f, stderr=subprocess.STDOUT)
        try:
            _wait_for(log, "on SIGUSR1: checkpoint at the next step", proc)
            time.sleep(1.0)
            proc.send_signal(signal.SIGUSR1)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert rc == PREEMPTED_EXIT_CODE, text[-4000:]
    assert calls.read_text().split() == ["requeue", "4242"]
    last = tmp_path / "t" / "distill" / "checkpoints" / "last.ckpt"
    step = torch.load(last, weights_only=False)["global_step"]
    assert 0 < step < 100000 and f"checkpoint written to {last} at step {step}" in text
    assert not (tmp_path / "t" / "drafter").exists(), "a preempted run must not export"
    # the requeued job: same command line and output dir; it resumes from the signal's checkpoint
    proc = run_metattt("distill", _args(workspace, tmp_path, *common, f"--distill.max_steps={step + 2}"), env=env)
    assert f"resuming distillation from {last}" in proc.stderr
    assert torch.load(last, weights_only=False)["global_step"] == step + 2
    assert (tmp_path / "t" / "drafter" / "model.safetensors").is_file()


# --- exact resume after SIGKILL, corrupt checkpoints ------------------------------------------------

# 100 sequences, batch 16: 7 batches per epoch (the last one short). 12 steps cross an epoch end;
# the kill lands in epoch 1, mid-epoch, with validation every 5 steps and 8 random anchors per row.
RESUME = ["--data.batch_size=16", "--distill.max_steps=12", "--distill.checkpoint_every_n_steps=1",
          "--distill.val_check_interval=5", "--distill.max_epochs=10"]
KILL_AT = 9

KILLER = """
import os, signal, sys
import lightning as L
import metattt.stages as P

class Kill(L.Callback):  # SIGKILL mid-step (after backward) once the checkpoint of step KILL_AT is on disk
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == int(os.environ["KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)

make_trainer = P.make_trainer
P.make_trainer = lambda *a, **kw: make_trainer(*a, **{**kw, "extra_callbacks": [Kill()]})
from metattt.cli import main
main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def uninterrupted(workspace, tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("full")
    run_metattt("distill", _args(workspace, out, *RESUME))
    return exported_weights(out / "t" / "drafter")


@pytest.fixture(scope="module")
def killed(workspace, tmp_path_factory) -> Path:
    """The output dir of a run SIGKILLed during step KILL_AT + 1."""
    out = tmp_path_factory.mktemp("killed")
    cmd = [sys.executable, "-c", KILLER, "distill", *_args(workspace, out, *RESUME), "--trainer.accelerator=cpu"]
    proc = run_metattt("distill", [], command=cmd, env={"KILL_AT": str(KILL_AT)}, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-4000:]
    ckpts = out / "t" / "distill" / "checkpoints"
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == KILL_AT
    assert torch.load(ckpts / "last.prev.ckpt", weights_only=False)["global_step"] == KILL_AT - 1
    assert not (out / "t" / "drafter").exists()
    return out


def _copy(killed: Path, dst: Path) -> Path:
    shutil.copytree(killed, dst)
    return dst


@pytest.mark.e2e
def test_sigkill_then_resume_is_bitwise_exact(workspace, tmp_path, killed, uninterrupted):
    out = _copy(killed, tmp_path / "run")
    proc = run_metattt("distill", _args(workspace, out, *RESUME))
    assert f"resuming distillation from {out / 't' / 'distill' / 'checkpoints' / 'last.ckpt'}" in proc.stderr
    assert "data position restored: epoch 1, 32 samples already seen" in proc.stderr  # 2 of 7 batches
    resumed = exported_weights(out / "t" / "drafter")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted), max_abs_diff(resumed, uninterrupted)


@pytest.mark.e2e
def test_corrupt_last_checkpoint_falls_back_to_previous(workspace, tmp_path, killed, uninterrupted):
    out = _copy(killed, tmp_path / "run")
    last = out / "t" / "distill" / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])  # a truncated copy
    proc = run_metattt("distill", _args(workspace, out, *RESUME))
    assert f"ERROR metattt: checkpoint {last} is corrupt or truncated" in proc.stderr
    assert "falling back to last.prev.ckpt" in proc.stderr
    assert f"resuming distillation from {last.with_name('last.prev.ckpt')}" in proc.stderr
    # one step earlier, and still exact
    resumed = exported_weights(out / "t" / "drafter")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted), max_abs_diff(resumed, uninterrupted)
    assert checkpoint_is_loadable(last)[0]  # the resumed run wrote good ones again


@pytest.mark.e2e
def test_checkpoint_integrity_checks(tmp_path, caplog):
    io = AtomicCheckpointIO()
    d = tmp_path / "checkpoints"
    for step in (1, 2):
        io.save_checkpoint({"state_dict": {"w": torch.full((64, 64), float(step))}, "global_step": step}, d / "last.ckpt")
    assert torch.load(d / "last.prev.ckpt")["global_step"] == 1 and not list(d.glob(".*tmp*"))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (d / f".last.ckpt.tmp-{dead.pid}").write_bytes(b"half a checkpoint")  # a writer killed mid-write
    io.save_checkpoint({"state_dict": {"w": torch.full((64, 64), 2.0)}, "global_step": 2}, d / "last.ckpt")
    assert not list(d.glob(".*tmp*"))  # its temp file is cleaned up by the next save
    assert find_resumable_checkpoint(d) == str(d / "last.ckpt")
    # a flipped byte inside the tensor data: torch.load would not notice, the zip CRC does
    raw = bytearray((d / "last.ckpt").read_bytes())
    with zipfile.ZipFile(d / "last.ckpt") as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith("data/0"))
    raw[info.header_offset + 200] ^= 0xFF
    (d / "last.ckpt").write_bytes(bytes(raw))
    ok, why = checkpoint_is_loadable(d / "last.ckpt")
    assert not ok and "CRC" in why
    with caplog.at_level("ERROR", logger="metattt"):
        assert find_resumable_checkpoint(d) == str(d / "last.prev.ckpt")
    assert f"checkpoint {d / 'last.ckpt'} is corrupt or truncated" in caplog.text
    (d / "last.prev.ckpt").write_bytes(b"")
    (d / "other.ckpt").write_text(json.dumps({"not": "a checkpoint"}))
    assert find_resumable_checkpoint(d) is None
    assert "no usable checkpoint" in caplog.text


def test_resumable_sampler_global_order_and_mid_epoch_resume():
    data = list(range(23))
    one = ResumableSampler(data, num_replicas=1, rank=0, seed=3)
    two = [ResumableSampler(data, num_replicas=2, rank=r, seed=3) for r in range(2)]
    for epoch in (0, 1):
        one.set_epoch(epoch)
        for s in two:
            s.set_epoch(epoch)
        order = list(one)
        r0, r1 = list(two[0]), list(two[1])
        assert sorted(order) == data and len(r0) == len(r1) == 12
        # step i with batch 2B on 1 process = the union of step i with batch B on 2 processes
        assert {*order[0:8]} == {*r0[0:4], *r1[0:4]} and {*order[8:16]} == {*r0[4:8], *r1[4:8]}
    epoch1 = list(one)
    one.set_epoch(0)
    assert list(one) != epoch1  # a new order every epoch
    # a loader resumed at its saved position yields exactly the batches the original had left
    loader = ResumableDataLoader(data, batch_size=4, sampler=ResumableSampler(data, seed=3))
    loader.sampler.set_epoch(1)
    full = [b.tolist() for b in loader]
    it = iter(loader)
    seen = [next(it).tolist() for _ in range(2)]
    state = loader.state_dict()
    assert state["epoch"] == 1 and state["samples_seen"] == 8
    fresh = ResumableDataLoader(data, batch_size=4, sampler=ResumableSampler(data, seed=3))
    fresh.load_state_dict(state)
    rest = [b.tolist() for b in fresh]
    assert seen + rest == full
    fresh.sampler.set_epoch(2)  # the skip applies to the interrupted epoch only
    assert len([b for b in fresh]) == 6


@pytest.mark.e2e
def test_sbatch_template_runs_a_stage(workspace, tmp_path):
    """recipes/slurm/*.sbatch under a stand-in `srun` (runs its command once, Slurm variables set):
    the command line the template builds parses and runs, with devices/num_nodes from the allocation."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text('#!/bin/sh\nwhile [ "${1#-}" != "$1" ]; do shift; done\nexec "$@"\n')  # drop srun's options
    srun.chmod(0o755)
    args = [a for a in recipe_args(workspace, f"--run.output_root={tmp_path}", "--distill.max_steps=2",
                                   "--distill.val_check_interval=100") if a not in ("--config", "recipes/tiny.yaml")]
    env = {**SLURM_ENV, "SLURM_JOB_ID": "4243", "SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_NUM_NODES": "1",
           "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{clean_env()['PATH']}",
           "STAGE": "distill", "RECIPE": "tiny", "ACCELERATOR": "cpu", "PRECISION": "32-true", "ARGS": " ".join(args)}
    proc = run_metattt("distill", [], command=["bash", str(REPO / "recipes/slurm/single_node.sbatch")], env=env)
    assert "Initializing distributed: GLOBAL_RANK: 0, MEMBER: 1/1" in proc.stderr  # ddp under SLURMEnvironment
    assert torch.load(tmp_path / "t" / "distill" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    srun_lines = [(REPO / f"recipes/slurm/{f}").read_text().split("\nsrun ", 1)[1] for f in ("single_node.sbatch", "multi_node.sbatch")]
    assert srun_lines[0] == srun_lines[1]


@pytest.mark.e2e
def test_eval_on_two_processes_reports_every_prompt_as_one_process_does(workspace, tmp_path, distill_1proc):
    """Prompts are sharded over the ranks and gathered on rank 0: one report, the same records."""
    split = workspace / "corpus" / "validation.jsonl"
    args = [f"--eval.drafter_path={distill_1proc / 'drafter'}", f"--eval.splits={{in_domain: {split}}}",
            "--eval.num_prompts=3", "--eval.prompt_len=20", "--eval.max_new_tokens=10",
            "--eval.conditions=[static, online_zero]", "--eval.online.every=1"]
    run_metattt("eval", _args(workspace, tmp_path / "one", *args))
    run_metattt("eval", _args(workspace, tmp_path / "two", *args), devices=2)
    one, two = (json.loads((tmp_path / n / "t" / "eval" / "report.json").read_text()) for n in ("one", "two"))
    assert two["meta"]["world_size"] == 2 and one["meta"]["world_size"] == 1
    assert len(one["records"]) == len(two["records"]) == 3 * 2
    for a, b in zip(one["records"], two["records"]):
        keys = ("split", "prompt", "condition", "num_tokens", "accepted", "step_starts")
        assert [a.get(k) for k in keys] == [b.get(k) for k in keys]
    assert one["summary"]["in_domain"]["static"]["tau"] == two["summary"]["in_domain"]["static"]["tau"]
