"""Fixtures: private Slurm clusters on this machine (see slurm_cluster.py).

`slurm_cluster`: one node (this host, 2 CPUs), started once per session. `two_node_cluster`:
two slurmd nodes in network namespaces of their own, started only when a test asks.
Both stop at the end of the session and leave no process, interface or namespace behind.
"""
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from slurm_cluster import ClusterError, NetnsNetwork, Node, SlurmCluster, install_slurm  # noqa: E402


@pytest.fixture(scope="session")
def slurm_installed():
    reason = install_slurm()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_cluster(slurm_installed):
    # Addresses given, not resolved: a CI container's hostname may not resolve.
    cluster = SlurmCluster([Node(socket.gethostname().split(".")[0], addr="127.0.0.1")], name="mfone",
                           control_addr="127.0.0.1")
    try:
        cluster.start()
    except ClusterError as exc:
        pytest.fail(f"could not start a one-node Slurm cluster: {exc}")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def two_node_cluster(slurm_installed):
    reason = NetnsNetwork.available()
    if reason:
        pytest.skip(f"two Slurm nodes on one machine need network namespaces: {reason}")
    net = NetnsNetwork(2)
    cluster = None
    try:
        net.up()
        host = socket.gethostname().split(".")[0]
        nodes = []
        for i, (ns, addr) in enumerate(zip(net.names, net.addrs), 1):
            peers = "".join(f"{a} node{j}\n" for j, a in enumerate(net.addrs, 1) if j != i)
            nodes.append(Node(f"node{i}", addr=addr, netns=ns,
                              hosts=f"127.0.0.1 localhost\n{addr} {host} node{i}\n{peers}"))
        cluster = SlurmCluster(nodes, name="mftwo", control_addr=net.gateway, shm_per_node=True)
        cluster.start()
    except ClusterError as exc:
        if cluster is not None:
            cluster.stop()
        net.down()
        pytest.fail(f"could not start a two-node Slurm cluster: {exc}")
    yield cluster
    cluster.stop()
    net.down()
