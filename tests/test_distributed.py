"""examples/distributed_svi.py run by torchrun with 2 processes on localhost reaches the single-process result."""

import os
import pathlib
import socket
import subprocess
import sys

import pytest
import torch

SCRIPT = pathlib.Path(__file__).parent.parent / "examples" / "distributed_svi.py"


def free_local_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_env():
    """Environment that keeps gloo on the loopback interface and each process on one thread."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    loopback = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
    if loopback and "GLOO_SOCKET_IFNAME" not in env:
        env["GLOO_SOCKET_IFNAME"] = loopback[0]
    return env


def run(command, env):
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env, cwd=SCRIPT.parent.parent)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def run_torchrun(script_args, env):
    """Two processes on 127.0.0.1; a second try with a new port if another process took the free one first."""
    for attempt in range(2):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                    "--master_addr=127.0.0.1", f"--master_port={free_local_port()}"]
        command = [*launcher, str(SCRIPT), *script_args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env,
                                cwd=SCRIPT.parent.parent)
        if result.returncode == 0 or attempt == 1 or "address already in use" not in result.stderr.lower():
            assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
            return result


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_processes_reach_the_single_process_parameters(tmp_path):
    env = loopback_env()
    args = ["--num-steps", "60"]
    run([sys.executable, str(SCRIPT), *args, "--output", str(tmp_path / "one.pt")], env)
    two = run_torchrun([*args, "--output", str(tmp_path / "two.pt")], env)
    assert "2 process(es), shards of 32 of 64 rows" in two.stdout
    one, two = (torch.load(tmp_path / name) for name in ("one.pt", "two.pt"))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["params"].keys() == two["params"].keys() == {"loc", "scale_unconstrained", "scale_tril_unconstrained"}
    for name, value in one["params"].items():
        # The all-reduced gradient equals the single-process one up to the order of the floating-point sums.
        torch.testing.assert_close(two["params"][name], value, rtol=1e-7, atol=1e-7)
        assert not torch.equal(value, torch.zeros_like(value))
