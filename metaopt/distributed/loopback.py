"""A Ray session whose traffic stays on loopback (tests, benchmarks, laptops).

Ray binds the machine's network address even when told ``127.0.0.1``. Started
inside a network namespace that has only ``lo`` (``unshare --net`` as root, then
``ip link set lo up``) it can only find ``127.0.0.1``. :func:`netns_command` wraps a
command so; :func:`init_loopback_ray`, run inside, starts the session with its
files under a short directory the caller owns (AF_UNIX socket paths are limited to
107 bytes) and refuses a node address outside ``127.0.0.0/8``. The subprocess's
environment should set ``RAY_AUTH_MODE=disabled`` (:func:`loopback_env`), or Ray
writes a token under the home directory.
"""

from __future__ import annotations

import ipaddress
import os
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence

from metaopt.distributed.executor import WorkerError, _import_ray

__all__ = ["can_unshare", "init_loopback_ray", "loopback_env", "netns_command"]

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")


def can_unshare() -> bool:
    """Whether this process may create a network namespace (root, ``unshare``, ``ip``)."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    return subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode == 0


def netns_command(argv: Sequence[str]) -> list[str]:
    """``argv`` run in a new network namespace whose only interface is ``lo``."""
    return ["unshare", "--net", "sh", "-c", f"ip link set lo up && exec {shlex.join(argv)}"]


def loopback_env(base: Mapping[str, str], pythonpath: str) -> dict[str, str]:
    """``base`` without ``RAY_*`` settings, plus ``RAY_AUTH_MODE=disabled`` and PYTHONPATH."""
    env = {k: v for k, v in base.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="disabled", PYTHONPATH=pythonpath)
    return env


def init_loopback_ray(temp_dir: str, num_cpus: int) -> list[str]:
    """Start Ray with files under ``temp_dir``; the node addresses (all loopback).

    Raises :class:`WorkerError` (after shutting Ray down) if a node is not on
    ``127.0.0.0/8`` — run inside :func:`netns_command`.
    """
    if len(os.path.join(temp_dir, "session_latest", "sockets", "plasma_store")) > 100:
        raise ValueError(f"temp_dir {temp_dir!r} is too long for Ray's socket paths")
    ray = _import_ray()
    ray.init(num_cpus=num_cpus, include_dashboard=False, _temp_dir=temp_dir,
             log_to_driver=False)
    addresses = sorted({n["NodeManagerAddress"] for n in ray.nodes()}
                       | {ray.util.get_node_ip_address()})
    if not all(ipaddress.ip_address(a) in LOOPBACK for a in addresses):
        ray.shutdown()
        raise WorkerError(f"ray node addresses {addresses} are not loopback; run inside "
                          f"a network namespace with only lo (netns_command)")
    return addresses
