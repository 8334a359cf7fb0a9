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


def run_torchrun(script_args, env, script=SCRIPT):
    """Two processes on 127.0.0.1; a second try with a new port if another process took the free one first."""
    for attempt in range(2):
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=1",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={free_local_port()}",
        ]
        command = [*launcher, str(script), *script_args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env, cwd=SCRIPT.parent.parent)
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


# Runs the example as torchrun would, and writes the threads each process has just before the example's
# init_process_group and just after its destroy_process_group to REPORTS/rank<RANK>-{init,destroy}.txt. Native
# threads are listed from /proc, which Python's threading does not see.
TEARDOWN_PROBE = """
import glob, os, pathlib, runpy
import torch.distributed as dist

def report(when):
    names = sorted(open(path).read().strip() for path in glob.glob("/proc/self/task/*/comm"))
    (pathlib.Path(REPORTS) / f"rank{os.environ['RANK']}-{when}.txt").write_text("\\n".join(names))

init, destroy = dist.init_process_group, dist.destroy_process_group

def init_and_report(*args, **kwargs):
    report("init")
    init(*args, **kwargs)

def destroy_and_report(*args, **kwargs):
    destroy(*args, **kwargs)
    report("destroy")

dist.init_process_group, dist.destroy_process_group = init_and_report, destroy_and_report
runpy.run_path(EXAMPLE, run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="lists native threads from Linux's /proc")
def test_gloo_threads_end_with_the_process_group(tmp_path):
    """destroy_process_group really ends the group: each process is back to the threads it had before the group.

    A group that outlives it (torch.distributed.nn, imported by torch.optim through torch._dynamo after
    init_process_group, holds it in default arguments) keeps gloo's threads running into interpreter exit, where
    tearing them down can abort a rank with "terminate called without an active exception".
    """
    probe = tmp_path / "probe.py"
    probe.write_text(f"EXAMPLE = {str(SCRIPT)!r}\nREPORTS = {str(tmp_path)!r}\n" + TEARDOWN_PROBE)
    run_torchrun(["--num-steps", "2"], loopback_env(), script=probe)
    for rank in range(2):
        before, after = ((tmp_path / f"rank{rank}-{when}.txt").read_text().splitlines() for when in ("init", "destroy"))
        assert before, f"rank {rank} listed no threads"
        assert after == before, f"rank {rank}: threads {before} before the group, {after} after destroying it"
