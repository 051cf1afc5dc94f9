"""The ring example under ``torchrun`` as two "machines": two agents on this machine,
one process each, meeting through a c10d rendezvous on 127.0.0.1, as a user with two
machines runs it (each machine runs the same command with the first machine's
address). The result equals one process."""

import os
import subprocess
import sys
from pathlib import Path

from companion.torch.distributed import free_port

ROOT = Path(__file__).resolve().parent.parent


def _agent(node_rank: int, port: int, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            "--nproc-per-node=1",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}",
            "--rdzv-id=companion-two-nodes",
            f"--node-rank={node_rank}",  # used by static rendezvous; c10d assigns
            "-m",
            "companion.torch.distributed",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_agents_of_torchrun_equal_one_process():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    port = free_port()
    agents = [_agent(node, port, env) for node in (0, 1)]
    outputs = []
    try:
        for agent in agents:
            outputs.append(agent.communicate(timeout=240))
    finally:
        for agent in agents:  # none left behind, whatever happened
            if agent.poll() is None:
                agent.kill()
                agent.wait()
    for agent, (out, err) in zip(agents, outputs):
        assert agent.returncode == 0, out + err
    stdout = "".join(out for out, _ in outputs)  # rank 0 is on either agent
    assert stdout.count("worst difference from one process") == 1
    assert "W=2 zigzag     causal=True" in stdout
    worst = float(stdout.split("worst difference from one process")[1])
    assert worst <= 1e-10
