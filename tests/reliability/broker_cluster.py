"""A private three-node RabbitMQ cluster on loopback, for the node-loss tests.

Three :class:`~tests.reliability.private_broker.PrivateBroker` nodes (own node names, AMQP and
distribution ports, data dirs) sharing one Erlang cookie and one user; nodes 2 and 3 ``join_cluster``
node 1. RabbitMQ 3.10 from the host, or 4.0 from the rootfs in ``WORKQUEUE_TEST_RABBITMQ_ROOT`` (as
for single private nodes). ``net_ticktime`` is short so a paused node is noticed in seconds, and
``autoheal`` mends the partition a node paused past net_ticktime leaves behind (it resumes believing
nothing happened; ``pause_minority`` never notices and the cluster stays split: tried here).
"""

from __future__ import annotations

import json
import secrets
import signal
import threading
import time

from tests.reliability.private_broker import PrivateBroker, PrivateBrokerError

NET_TICKTIME = 8  # seconds; a node is declared down after 8-12 s without an answer (RabbitMQ's default: 60)
CONFIG = ["cluster_partition_handling = autoheal"]
ADVANCED = f"[{{kernel, [{{net_ticktime, {NET_TICKTIME}}}]}}, {{rabbit, [{{channel_tick_interval, 1000}}]}}]"


class BrokerCluster:
    """Three clustered nodes; ``url``/``host_list`` name all of them, node 1 first."""

    def __init__(self, size: int = 3) -> None:
        cookie, password = secrets.token_hex(16), secrets.token_urlsafe(24)
        self.nodes = [PrivateBroker(config=CONFIG, advanced=ADVANCED, cookie=cookie, password=password)
                      for _ in range(size)]

    @property
    def user(self) -> str:
        return self.nodes[0].user

    @property
    def password(self) -> str:
        return self.nodes[0].password

    def host_list(self, order: list[int] | None = None, host: str = "127.0.0.1") -> str:
        """``host:p1,host:p2,...`` in ``order`` (node indexes; default 0, 1, 2); pods reach the nodes at the
        cluster's ``host_ip``."""
        return ",".join(f"{host}:{self.nodes[i].port}" for i in (order or range(len(self.nodes))))

    def url(self, order: list[int] | None = None) -> str:
        return f"amqp://{self.user}:{self.password}@{self.host_list(order)}/"

    def node_url(self, index: int) -> str:
        return self.nodes[index].url

    def start(self) -> BrokerCluster:
        first, *others = self.nodes
        first.start()
        for node in others:
            node.start()
            for args in (("stop_app",), ("join_cluster", first.node), ("start_app",)):
                result = node.ctl(*args, timeout=120)
                if result.returncode != 0:
                    raise PrivateBrokerError(f"{node.node}: rabbitmqctl {' '.join(args)} failed: {result.stderr}")
            node.wait_until_running()
        running = self.running_nodes()
        if sorted(running) != sorted(n.node for n in self.nodes):
            raise PrivateBrokerError(f"the cluster formed with {running}, not all of {[n.node for n in self.nodes]}")
        return self

    def running_nodes(self, via: int = 0) -> list[str]:
        result = self.nodes[via].ctl("cluster_status", "--formatter", "json")
        if result.returncode != 0:
            raise PrivateBrokerError(f"cluster_status failed: {result.stderr}")
        return json.loads(result.stdout)["running_nodes"]

    def queue_info(self, name: str, via: int = 0) -> dict:
        """``{"type", "leader", "members", "messages"}`` of queue ``name`` as the cluster reports it."""
        result = self.nodes[via].ctl("list_queues", "name", "type", "leader", "members", "messages",
                                     "--formatter", "json")
        if result.returncode != 0:
            raise PrivateBrokerError(f"list_queues failed: {result.stderr}")
        for row in json.loads(result.stdout):
            if row["name"] == name:
                return row
        raise PrivateBrokerError(f"queue {name!r} not found on the cluster")

    def index_of(self, node_name: str) -> int:
        return [n.node for n in self.nodes].index(node_name)

    def leader_of(self, queue: str, via: int = 0) -> int:
        return self.index_of(self.queue_info(queue, via)["leader"])

    def wait_for_leader(self, queue: str, *, via: int, not_on: int | None = None, timeout: float = 60) -> int:
        """The index of ``queue``'s leader once one is elected (elsewhere than ``not_on``)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                leader = self.leader_of(queue, via)
                if leader != not_on:
                    return leader
            except (PrivateBrokerError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"queue {queue!r} has no leader after {timeout} s")
            time.sleep(0.2)

    def wait_until_clustered(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        wanted = sorted(n.node for n in self.nodes)
        while True:
            try:
                if all(sorted(self.running_nodes(i)) == wanted for i in range(len(self.nodes))):
                    return
            except (PrivateBrokerError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the cluster did not re-form within {timeout} s")
            time.sleep(0.5)

    def mend(self, timeout: float = 120) -> bool:
        """The cluster whole again; True if that took restarting every node. A partition that ``autoheal``
        didn't mend within ``timeout`` (seen on RabbitMQ 4.0 after a node paused past net_ticktime) is
        ended the way an operator ends it: every node SIGKILLed (a partitioned node may not stop cleanly)
        and started again on its data, all at once (a clustered node waits for its peers on boot)."""
        try:
            self.wait_until_clustered(timeout)
            return False
        except AssertionError:
            pass
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.signal(signal.SIGCONT)
                node.kill()
        self.each(lambda node: node.restart())
        self.wait_until_clustered(timeout)
        return True

    def kill(self, index: int) -> None:
        self.nodes[index].kill()

    def pause(self, index: int) -> None:
        self.nodes[index].signal(signal.SIGSTOP)

    def resume(self, index: int) -> None:
        self.nodes[index].signal(signal.SIGCONT)

    def restart(self, index: int) -> None:
        self.nodes[index].restart()

    def restart_all(self) -> None:
        """Shut every node down cleanly (as a rollout of the StatefulSet does), then start them all at once
        (a clustered node waits for its peers on boot)."""
        self.each(lambda node: node.shutdown())
        self.each(lambda node: node.restart())

    def each(self, action) -> None:
        errors: list[BaseException] = []

        def run(node: PrivateBroker) -> None:
            try:
                action(node)
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)
        threads = [threading.Thread(target=run, args=(node,)) for node in self.nodes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    def stop(self) -> None:
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.signal(signal.SIGCONT)  # a paused node can't stop
            node.stop()
