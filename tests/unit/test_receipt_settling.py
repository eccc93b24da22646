"""A receipt that comes back unroutable never lets its item be acked (amqp/settling.py).

The broker confirms (acks) a mandatory message it returned, so after a basic.return a confirm proves
nothing: the consumer acks no item from then on and makes the worker reconnect, which tells a deleted
ledger from one that was only unreachable from its node. Proven end to end by the cluster test of a
paused node (tests/reliability/test_cluster_node_loss.py); here the rule itself, with fake channels.
"""

from __future__ import annotations

from types import SimpleNamespace

import pika.spec
import pytest

from workqueue_provider.amqp.connection import BrokerSettings
from workqueue_provider.amqp.consumer import ConsumerLost, QueueConsumer
from workqueue_provider.amqp.deliveries import Delivery


class Channel:
    is_closed = False

    def __init__(self) -> None:
        self.acked: list[int] = []
        self.published: list[str | None] = []

    def basic_ack(self, tag: int, multiple: bool = False) -> None:
        self.acked.extend(t for t in range(1, tag + 1) if t not in self.acked) if multiple else self.acked.append(tag)

    def basic_publish(self, _exchange, _key, _body, properties, mandatory=False) -> None:
        self.published.append(properties.message_id)


def consumer_holding(*items: str) -> tuple[QueueConsumer, Channel, Channel, list[Delivery]]:
    consumer = QueueConsumer(BrokerSettings(host="127.0.0.1"), "q", prefetch=len(items))
    consuming, ledger = Channel(), Channel()
    consumer.connection = SimpleNamespace(is_closed=False)  # type: ignore[assignment]
    consumer._channel, consumer._ledger = consuming, ledger
    deliveries = [Delivery(tag, item.encode(), item, False,
                           pika.BasicProperties(message_id=item, headers={"x-workqueue-fill": "f"}))
                  for tag, item in enumerate(items, start=1)]
    consumer._outstanding.update(d.tag for d in deliveries)
    return consumer, consuming, ledger, deliveries


def confirm(consumer: QueueConsumer, up_to: int) -> None:
    consumer._on_confirm(SimpleNamespace(method=pika.spec.Basic.Ack(delivery_tag=up_to, multiple=True)))


def test_an_item_is_acked_once_its_receipt_is_confirmed():
    consumer, consuming, ledger, (first, second) = consumer_holding("a", "b")
    consumer.finish(first)
    consumer.finish(second)
    assert ledger.published == ["a", "b"] and consuming.acked == []
    confirm(consumer, 2)
    assert consuming.acked == [1, 2] and consumer.unsettled == 0


def test_after_a_returned_receipt_no_item_is_acked_and_the_worker_reconnects():
    consumer, consuming, ledger, (first, second) = consumer_holding("a", "b")
    consumer.finish(first)
    consumer.finish(second)
    consumer._on_return(None, None, None, b"")  # the broker returns a's receipt (then confirms both)
    confirm(consumer, 2)
    assert consuming.acked == [], "a returned receipt's item (or a later one) was acked: it would count as lost"
    assert not consumer.ledger_gone, "only a reconnect that finds no receipts queue drops the ledger"
    with pytest.raises(ConsumerLost, match="receipt came back unroutable"):
        consumer._call(lambda: None)
