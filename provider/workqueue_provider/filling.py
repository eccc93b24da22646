"""Filling a queue exactly once per run: a retry replaces what an earlier attempt left, never adds to it.

Every message carries the fill's id (DAG, task, run) in a header and its index as message id; the
fill keeps a ledger in ``<queue>.receipts`` (what it set out to publish, then what was confirmed).
From that ledger a retry knows whether the queue's messages are all its own (then it purges and
publishes again) and whether the fill already completed (then it publishes nothing). The queue's
messages are never peeked at.
"""

from __future__ import annotations

from workqueue_provider.amqp import receipts
from workqueue_provider.amqp.publisher import PublishResult
from workqueue_provider.amqp.queues import FILL_HEADER, fill_key
from workqueue_provider.exceptions import ConfigurationError, PublishError
from workqueue_provider.hooks.amqp import AmqpHook
from workqueue_provider.items import ItemEncoder, Spool
from workqueue_provider.verification import Log


class QueueFill:
    """Publishes a spool of encoded items into one queue for one fill id."""

    def __init__(self, amqp: AmqpHook, queue_name: str, log: Log, *, on_existing_messages: str, window: int,
                 progress_every: float) -> None:
        self.amqp, self.queue_name, self.log = amqp, queue_name, log
        self.on_existing_messages = on_existing_messages
        self.window = window
        self.progress_every = progress_every

    def run(self, spool: Spool, encoder: ItemEncoder, fill_id: str) -> int:
        """Make room, start the ledger, publish, record the fill. A broker outage (a lost connection,
        no answer) retries all of it within the connection's outage window: exact, as a retry is."""
        return self.amqp.ride_out(f"filling queue {self.queue_name!r}",
                                  lambda: self._fill_once(spool, encoder, fill_id))

    def _fill_once(self, spool: Spool, encoder: ItemEncoder, fill_id: str) -> int:
        done = self._already_filled(fill_id)
        if done is not None:
            return done
        self._make_room(fill_id)
        self.amqp.start_ledger(self.queue_name, fill_id, spool.count)
        result = PublishResult(0, 0.0)
        if spool.count:
            try:
                result = self.amqp.publish(
                    self.queue_name, spool.bodies(), total=spool.count, window=self.window,
                    content_type=encoder.content_type, headers={FILL_HEADER: fill_key(fill_id)},
                    message_ids=receipts.message_id_for,
                    on_progress=lambda done, secs: self.log.info(
                        "Published %d/%d items to %r (%.0f items/s).", done, spool.count, self.queue_name,
                        done / secs if secs else 0.0),
                    progress_every=self.progress_every,
                )
            except PublishError as e:
                self._record_stopped(fill_id, e)
                raise
        self.amqp.record_fill(self.queue_name, fill_id, result.confirmed)
        self.log.info("Published and confirmed %d items to queue %r in %.2f s (%.0f items/s).",
                      result.confirmed, self.queue_name, result.seconds, result.rate)
        return result.confirmed

    def _already_filled(self, fill_id: str) -> int | None:
        """This fill (same DAG, task and run) already published every item: a cleared run, or a retry after
        the fill record was written. Publishing again would process the finished items twice, so the queue
        is left as it is (holding what is still to do) and the count is returned; None otherwise."""
        trace = self.amqp.last_fill(self.queue_name)
        if trace is None or trace.fill_id != fill_id or not trace.complete:
            return None
        left = self.amqp.queue_depth(self.queue_name).messages
        self.log.warning("This fill already published its %d items to %r in an earlier try of this run (%d processed "
                         "since, %d waiting in the queue): not publishing them again, so the next tasks finish what is "
                         "left. To process every item again, trigger a new run.", trace.count, self.queue_name,
                         trace.processed, left)
        return trace.count

    def _record_stopped(self, fill_id: str, error: PublishError) -> None:
        """Tell the next attempt how deep this one left the queue (best effort: with the broker gone
        the ledger keeps only the start record, and the next attempt goes by the item count)."""
        try:
            depth = self.amqp.record_fill_stopped(self.queue_name, fill_id, error.confirmed)
        except Exception as e:  # the broker is gone: the fill's own error says so, raised next
            self.log.warning("Could not record where this attempt stopped (%s).", type(e).__name__)
            return
        self.log.warning("This attempt stopped with %d of %d items confirmed, leaving %d messages in %r.",
                         error.confirmed, error.total, depth, self.queue_name)

    def _make_room(self, fill_id: str) -> None:
        """Empty the queue of an earlier attempt's messages (retry), or refuse/purge foreign ones.

        The queue is never peeked at (a peek counts as a delivery of someone else's message; only a
        reading of 0 is checked with a basic.get, which takes nothing from an empty queue): the
        ledger (``Q.receipts``) says which fill published last and how deep it left the queue; only a
        queue exactly that deep is purged as this fill's own (see ``receipts.FillTrace.explains``)."""
        depth = self.amqp.queue_depth(self.queue_name, checked=True).messages
        if depth == 0:
            return
        trace = self.amqp.last_fill(self.queue_name)
        own = trace is not None and trace.fill_id == fill_id
        if trace is not None and own and trace.explains(depth):
            removed = self.amqp.purge_queue(self.queue_name)
            self.log.warning("Retry: purged the %d messages an earlier attempt of this fill left in %r (its ledger "
                             "accounts for every one); publishing all items again.", removed, self.queue_name)
        elif self.on_existing_messages == "purge":
            removed = self.amqp.purge_queue(self.queue_name)
            self.log.warning("Purged %d messages already in %r (on_existing_messages='purge').", removed,
                             self.queue_name)
        elif own:
            raise ConfigurationError(
                f"Queue {self.queue_name!r} holds {depth} messages, not the number an earlier attempt of this fill "
                f"left there ({trace}): other producers published to it too, so it is not purged. Use a fresh "
                "queue per run, or set on_existing_messages='purge' to drop them all."
            )
        else:
            raise ConfigurationError(
                f"Queue {self.queue_name!r} already holds {depth} messages that this fill did not publish: "
                "use a fresh queue per run, or set on_existing_messages='purge' to drop them."
            )
