"""scripts/slurm/*.sbatch without SLURM: each script runs under bash in a fake repository, with fake `scontrol` and
`srun` on PATH and a fake python that records what torchrun would have been given and then plays the trainer
(finishes, fails, exits 75, or leaves the preemption marker as nest_ssl.train does). Issue 30, items 3-7."""
from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

SLURM_DIR = Path(__file__).resolve().parent.parent / "scripts" / "slurm"
USR1_BIT = 1 << (signal.SIGUSR1 - 1)

FAKE_PYTHON = r"""#!/bin/bash
printf '%s\n' "$@" > "$FAKE_OUT/args"
env > "$FAKE_OUT/env"
sed -n 's/^SigIgn:\s*//p' /proc/$$/status > "$FAKE_OUT/sigign"
touch "$FAKE_OUT/started"
case "$FAKE_ACTION" in
    ok) exit 0 ;;
    fail) exit 3 ;;
    rc75) exit 75 ;;  # plain python / srun: the trainer's own code
    preempt) echo "checkpoint at step 5" > "$NEST_REQUEUE_MARKER"; exit 1 ;;  # torchrun turns 75 into 1
    wait_for_preempt_file)  # the batch shell got the signal: it touches the file every rank checks
        for _ in $(seq 200); do
            if [ -f "$NEST_PREEMPT_FILE" ]; then echo "checkpoint at step 7" > "$NEST_REQUEUE_MARKER"; exit 1; fi
            sleep 0.05
        done
        exit 4 ;;
esac
"""
FAKE_SCONTROL = r"""#!/bin/bash
echo "$*" >> "$FAKE_OUT/scontrol"
case "$1" in
    show) [ "$2" = job ] && printf '   Command=%s\n   WorkDir=/x\n' "$FAKE_COMMAND"
          [ "$2" = hostnames ] && echo node7 ;;
    requeue) exit "${FAKE_REQUEUE_RC:-0}" ;;
esac
"""
FAKE_SRUN = r"""#!/bin/bash
while [[ "$1" == -* ]]; do shift; done  # srun's own options
exec "$@"
"""


def _exe(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def fake(tmp_path):
    """A repository copy (the real scripts, empty configs, a .venv whose python is the fake), fake tools, an
    environment as SLURM gives a batch job (job 1234, 4 CPUs per task, no GPUs) and a spool copy of each script."""
    repo = tmp_path / "repo with space"
    for f in SLURM_DIR.iterdir():
        if f.suffix in (".sh", ".sbatch"):
            (repo / "scripts" / "slurm").mkdir(parents=True, exist_ok=True)
            shutil.copy(f, repo / "scripts" / "slurm" / f.name)
    for name in ("nest_fast-conformer.yaml", "nest_fast-conformer_xl.yaml"):
        (repo / "configs").mkdir(exist_ok=True)
        (repo / "configs" / name).write_text("")
    _exe(repo / ".venv" / "bin" / "python", FAKE_PYTHON)
    (repo / ".venv" / "bin" / "activate").write_text(f'export VIRTUAL_ENV="{repo}/.venv"\n')
    bin_dir, out, submit = tmp_path / "bin", tmp_path / "out", tmp_path / "submit"
    _exe(bin_dir / "scontrol", FAKE_SCONTROL)
    _exe(bin_dir / "srun", FAKE_SRUN)
    _exe(bin_dir / "python3", FAKE_PYTHON)
    out.mkdir()
    submit.mkdir()
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "FAKE_OUT": str(out), "FAKE_ACTION": "ok",
           "SLURM_JOB_ID": "1234", "SLURM_CPUS_PER_TASK": "4", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "node7",
           "SLURM_SUBMIT_DIR": str(submit)}

    class Fake:
        def __init__(self):
            self.repo, self.out, self.submit, self.env, self.tmp = repo, out, submit, env, tmp_path

        def start(self, script: str, *args: str, **env_over: str) -> subprocess.Popen:
            spool = tmp_path / "spool" / script  # sbatch runs a copy: $0 says nothing about the repository
            spool.parent.mkdir(exist_ok=True)
            shutil.copy(repo / "scripts" / "slurm" / script, spool)
            e = {**self.env, "FAKE_COMMAND": f"{repo}/scripts/slurm/{script} {' '.join(args)}".strip(), **env_over}
            e = {k: v for k, v in e.items() if v is not None}
            return subprocess.Popen(["bash", str(spool), *args], cwd=submit, env=e, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

        def run(self, script: str, *args: str, **env_over: str) -> tuple[int, str]:
            proc = self.start(script, *args, **env_over)
            log, _ = proc.communicate(timeout=30)
            return proc.returncode, log

        def args(self) -> list[str]:
            return (out / "args").read_text().splitlines()

        def env_of_trainer(self) -> dict:
            return dict(line.split("=", 1) for line in (out / "env").read_text().splitlines() if "=" in line)

        def scontrol(self) -> list[str]:
            p = out / "scontrol"
            return p.read_text().splitlines() if p.exists() else []

    return Fake()


def test_single_node_from_a_spool_copy_finds_the_repo_and_launches_torchrun(fake):
    rc, log = fake.run("pretrain_single_node.sbatch", "model.train_ds.manifest_filepath=train.json",
                       NPROC_PER_NODE="2")
    assert rc == 0, log
    root, py = str(fake.repo), f"{fake.repo}/.venv/bin/python"
    assert fake.args() == ["-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                           "--master_addr=127.0.0.1", "--master_port=11234", f"{root}/scripts/pretrain.py",
                           "--config", f"{root}/configs/nest_fast-conformer.yaml",
                           f"exp_manager.exp_dir={root}/nemo_experiments", "exp_manager.resume_if_exists=true",
                           "model.train_ds.manifest_filepath=train.json"]
    first = log.splitlines()[:3]
    assert f"repo {root} (scontrol show job: Command=)" in first[0] and f"cwd {fake.submit}" in first[0]
    assert first[1] == f"nest_ssl: python {py} (activated {root}/.venv)"
    env = fake.env_of_trainer()
    assert env["OMP_NUM_THREADS"] == "2" and env["VIRTUAL_ENV"] == f"{root}/.venv"  # 4 CPUs / 2 ranks
    assert env["PYTHONPATH"] == root  # this checkout's nest_ssl, whatever the interpreter has installed
    assert int(open(fake.out / "sigign").read(), 16) & USR1_BIT  # torchrun ignores USR1 (the workers do not)
    assert (fake.repo / "nemo_experiments").is_dir() and list(fake.submit.iterdir()) == []
    assert fake.scontrol() == ["show job 1234"]  # no requeue


def test_knobs_port_processes_threads_python_config_and_run_dir(fake):
    exp, py = fake.tmp / "exp", _exe(fake.tmp / "other" / "python", FAKE_PYTHON)
    (fake.submit / "mine.yaml").write_text("")
    rc, log = fake.run("pretrain_single_node.sbatch", MASTER_PORT="29999", OMP_NUM_THREADS="3",
                       SLURM_GPUS_ON_NODE="8", NEST_SSL_PYTHON=str(py), NEST_EXP_DIR=str(exp), CONFIG="mine.yaml")
    assert rc == 0, log
    args = fake.args()
    assert "--nproc_per_node=8" in args and "--master_port=29999" in args and f"exp_manager.exp_dir={exp}" in args
    assert args[args.index("--config") + 1] == "mine.yaml"  # relative to the submit directory, where it exists
    assert fake.env_of_trainer()["OMP_NUM_THREADS"] == "3" and f"python {py} (NEST_SSL_PYTHON)" in log
    assert "VIRTUAL_ENV" not in fake.env_of_trainer()
    rc, log = fake.run("pretrain_single_node.sbatch", SLURM_JOB_ID="51234")  # another job: another port
    assert rc == 0 and "--master_port=21234" in fake.args() and "--nproc_per_node=1" in fake.args()


def test_without_a_venv_python3_on_path_is_used_and_said(fake):
    shutil.rmtree(fake.repo / ".venv")
    rc, log = fake.run("pretrain_single_node.sbatch")
    assert rc == 0 and f"python {fake.tmp}/bin/python3 (python3 on PATH: no {fake.repo}/.venv" in log, log


@pytest.mark.parametrize("action,rc,requeued", [
    ("preempt", 0, True),   # a signal reached the job step (scancel --signal=TERM): the marker, exit 1 from torchrun
    ("rc75", 0, True),      # the trainer's own exit code, launched without torchrun
    ("fail", 3, False),     # a crash: the job fails with its code, not requeued forever
])
def test_the_requeue_decision(fake, action, rc, requeued):
    got, log = fake.run("pretrain_single_node.sbatch", FAKE_ACTION=action)
    assert got == rc, log
    assert ("requeue 1234" in fake.scontrol()) == requeued
    assert not list((fake.repo / "nemo_experiments").iterdir())  # neither marker nor preempt file is left behind
    if action == "preempt":
        assert "preempted (checkpoint at step 5): requeueing job 1234" in log


def test_a_failed_requeue_fails_the_job(fake):
    rc, log = fake.run("pretrain_single_node.sbatch", FAKE_ACTION="preempt", FAKE_REQUEUE_RC="1")
    assert rc == 1 and "scontrol requeue 1234 failed" in log


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_a_signal_to_the_batch_shell_reaches_the_ranks_and_requeues(fake, sig):
    """--signal=B:USR1@N (the time limit) or scancel -b: the shell's trap touches NEST_PREEMPT_FILE."""
    proc = fake.start("pretrain_single_node.sbatch", FAKE_ACTION="wait_for_preempt_file")
    deadline = time.monotonic() + 20
    while not (fake.out / "started").exists():
        assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    proc.send_signal(sig)
    log, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "preempted (checkpoint at step 7)" in log, log
    assert "requeue 1234" in fake.scontrol()


def test_xl_runs_the_multi_node_launch_with_its_config_and_fsdp(fake):
    rc, log = fake.run("pretrain_xl_fsdp.sbatch", "model.train_ds.manifest_filepath=t.json", NPROC_PER_NODE="2")
    assert rc == 0, log
    args, root = fake.args(), str(fake.repo)
    assert args[args.index("--config") + 1] == f"{root}/configs/nest_fast-conformer_xl.yaml"
    assert "--rdzv_endpoint=node7:11234" in args and "--nnodes=1" in args and "trainer.num_nodes=1" in args
    assert args[-5:] == ["trainer.strategy=fsdp", "trainer.precision=bf16-mixed",
                         "trainer.activation_checkpointing=every_2",
                         "exp_manager.checkpoint_callback_params.async_save=true",
                         "model.train_ds.manifest_filepath=t.json"]


def test_started_with_plain_bash_the_script_finds_the_repo_from_its_location(fake):
    e = {**fake.env, "SLURM_JOB_ID": "", "MASTER_PORT": "12345"}
    proc = subprocess.run(["bash", str(fake.repo / "scripts/slurm/pretrain_single_node.sbatch")], cwd=fake.submit,
                          env=e, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and f"repo {fake.repo} (the script's location)" in proc.stdout, proc.stdout


@pytest.mark.parametrize("env,needle", [
    ({"NPROC_PER_NODE": "two"}, "NPROC_PER_NODE='two' is not a positive integer"),
    ({"OMP_NUM_THREADS": "0"}, "OMP_NUM_THREADS='0' is not a positive integer"),
    ({"MASTER_PORT": "70000"}, "MASTER_PORT='70000' is not a port number"),
    ({"CONFIG": "nope.yaml"}, "CONFIG '"),
    ({"NEST_SSL_PYTHON": "/nonexistent/python"}, "python '/nonexistent/python' is not an executable file"),
    ({"NEST_SSL_ROOT": "/nonexistent"}, "no /nonexistent/scripts/slurm/common.sh (NEST_SSL_ROOT); set NEST_SSL_ROOT"),
])
def test_bad_knobs_stop_the_job_with_one_line(fake, env, needle):
    rc, log = fake.run("pretrain_single_node.sbatch", **env)
    assert rc == 1 and needle in log and not (fake.out / "started").exists(), log
