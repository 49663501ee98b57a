"""scripts/*.sh: each prints the torchrun command and execs it with the right config, env and arguments."""

import os
import shlex
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def fake_torchrun(tmp_path):
    """A `torchrun` first on PATH that writes its arguments, one per line, to args.txt."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "torchrun"
    script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path / "args.txt"}\n')
    script.chmod(0o755)
    return tmp_path


def launch(script, fake_torchrun, *args, **env):
    full_env = {k: v for k, v in os.environ.items() if k not in ("GPUS_PER_NODE", "NNODES", "NODE_RANK",
                                                                 "MASTER_ADDR", "MASTER_PORT")}
    full_env.update(env, PATH=f"{fake_torchrun / 'bin'}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(["bash", os.path.join(ROOT, "scripts", script), *args], env=full_env,
                            cwd=fake_torchrun, capture_output=True, text=True, timeout=60)
    argv = (fake_torchrun / "args.txt").read_text().splitlines() if result.returncode == 0 else None
    return result, argv


@pytest.mark.parametrize(
    "script, config, gpus",
    [("pretrain_deepseek_v2_lite.sh", "deepseek_v2_lite.yaml", "8"),
     ("pretrain_deepseek_v2_lite_proxy.sh", "deepseek_v2_lite_proxy.yaml", "1")],
)
def test_single_node_launch(fake_torchrun, script, config, gpus):
    result, argv = launch(script, fake_torchrun, "--data-path", "data/my text_document", "--lr", "1.0e-4")
    assert result.returncode == 0, result.stderr
    assert argv == [
        "--nproc-per-node", gpus, "--nnodes", "1", "--node-rank", "0", "--master-addr", "localhost",
        "--master-port", "6000", "-m", "fp8flow_megatron.train", "--config", os.path.join(ROOT, "configs", config),
        "--data-path", "data/my text_document", "--lr", "1.0e-4",
    ]
    printed = result.stdout.strip().splitlines()[0]
    assert printed.startswith("+ torchrun ") and shlex.split(printed[2:])[1:] == argv  # the exact command, quoted


def test_multi_node_launch_uses_the_usual_environment(fake_torchrun):
    env = dict(NNODES="4", NODE_RANK="3", MASTER_ADDR="node0", MASTER_PORT="29500", GPUS_PER_NODE="8")
    result, argv = launch("pretrain_deepseek_v2_lite.sh", fake_torchrun, **env)
    assert result.returncode == 0, result.stderr
    assert argv[:10] == ["--nproc-per-node", "8", "--nnodes", "4", "--node-rank", "3", "--master-addr", "node0",
                         "--master-port", "29500"]


def test_launcher_rejects_a_missing_config(fake_torchrun):
    result, _ = launch("torchrun_train.sh", fake_torchrun, "configs/nope.yaml")
    assert result.returncode == 2 and "no config file configs/nope.yaml" in result.stderr
    result, _ = launch("torchrun_train.sh", fake_torchrun)
    assert result.returncode == 2 and "usage:" in result.stderr
    assert not (fake_torchrun / "args.txt").exists()
