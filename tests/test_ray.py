"""Ray scale-out: the checks in ray_cluster_checks.py run in a child pytest inside a fresh network namespace with
only loopback (``unshare -n``, root as in CI), so the local Ray cluster they start never touches a real network."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from slimswarm.deploy.loopback import in_loopback_namespace, loopback_argv, start_loopback_cluster

HERE = Path(__file__).resolve().parent
CHECKS = HERE / "ray_cluster_checks.py"


def test_a_local_ray_cluster_refuses_to_start_outside_a_loopback_namespace():
    assert not in_loopback_namespace()
    with pytest.raises(RuntimeError, match="never on the host network"):
        start_loopback_cluster([{"num_cpus": 1}])


def test_ray_cluster_checks_pass_inside_a_loopback_only_network_namespace():
    env = dict(os.environ)
    # the Ray worker processes import this checkout's slimswarm (they inherit the nodes' environment)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent / "src"), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", "1")
    # The replicas decode on the Python path here: on the native step stories260K answers all 80 calls of the
    # node-loss check faster than Ray removes a node, so no call would be in flight when it dies.
    env["SLIMSWARM_NATIVE"] = "0"
    cmd = loopback_argv([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", str(CHECKS)])
    r = subprocess.run(cmd, cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=400)
    tail = r.stdout[-6000:] + r.stderr[-3000:]
    assert r.returncode == 0, tail
    want = len(re.findall(r"^def test_", CHECKS.read_text(), re.M)) + 1  # + the second parametrized case
    m = re.search(r"(\d+) passed", r.stdout)
    assert m and int(m.group(1)) == want and "failed" not in r.stdout.splitlines()[-1], tail


def test_topologies_do_not_import_team_and_agents_never_import_deploy():
    src = HERE.parent / "src" / "slimswarm"
    # team.py imports topologies.py; the reverse only for annotations (indented under TYPE_CHECKING)
    assert not re.search(r"^(from \.team|import .*team)", (src / "agents" / "topologies.py").read_text(), re.M)
    assert re.search(r"^from \.topologies import", (src / "agents" / "team.py").read_text(), re.M)
    for f in (src / "agents").glob("*.py"):
        assert not re.search(r"^\s*(from|import) [.]*(slimswarm\.)?deploy", f.read_text(), re.M), f.name
