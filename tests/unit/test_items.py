import tracemalloc

import pytest

from workqueue_provider.exceptions import ConfigurationError, ItemSourceError
from workqueue_provider.items import ItemEncoder, iter_items, spool_items


def spooled(items, **encoder):
    with spool_items(iter_items(items), ItemEncoder(**encoder)) as spool:
        return list(spool.bodies())


def test_text_json_and_bytes_encodings():
    assert spooled(["apple", 3]) == [b"apple", b"3"]
    assert spooled([{"a": 1}, [1, 2]], encoding="json") == [b'{"a":1}', b"[1,2]"]
    assert spooled([b"\x00\xff"], encoding="bytes") == [b"\x00\xff"]


@pytest.mark.parametrize(
    ("items", "encoder", "fragment"),
    [
        pytest.param([{"a": 1}], {}, "use encoding='json'", id="dict-as-text"),
        pytest.param(["café"], {"charset": "ascii"}, "can't be encoded in ascii", id="charset"),
        pytest.param([object()], {"encoding": "json"}, "can't be encoded as JSON", id="not-json"),
        pytest.param([float("nan")], {"encoding": "json"}, "can't be encoded as JSON", id="nan"),
        pytest.param(["text"], {"encoding": "bytes"}, "not bytes", id="str-as-bytes"),
        pytest.param(["x" * 11], {"max_message_bytes": 10}, "over the 10-byte message limit", id="too-big"),
    ],
)
def test_unencodable_items_name_the_item(items, encoder, fragment):
    with pytest.raises(ItemSourceError, match=fragment) as raised:
        spooled(items, **encoder)
    assert "#0" in str(raised.value)


@pytest.mark.parametrize(
    ("encoder", "fragment"),
    [
        pytest.param({"encoding": "xml"}, "Unknown encoding 'xml'", id="encoding"),
        pytest.param({"charset": "klingon"}, "Unknown charset", id="charset"),
        pytest.param({"max_message_bytes": 0}, "must be a positive integer", id="zero-size"),
        pytest.param({"max_message_bytes": -5}, "must be a positive integer", id="negative-size"),
    ],
)
def test_bad_encoder_settings(encoder, fragment):
    with pytest.raises(ConfigurationError, match=fragment):
        ItemEncoder(**encoder)


def test_file_source_one_item_per_line(tmp_path):
    path = tmp_path / "items.txt"
    path.write_text("apple\nbanana\n\ncherry\r\n")
    assert list(iter_items(items_file=path)) == ["apple", "banana", "cherry"]


def test_missing_or_unreadable_file(tmp_path):
    with pytest.raises(ItemSourceError, match="can't be read"):
        list(iter_items(items_file=tmp_path / "missing.txt"))
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(ItemSourceError, match="not UTF-8"):
        list(iter_items(items_file=binary))


def test_exactly_one_source():
    with pytest.raises(ConfigurationError, match="exactly one item source"):
        iter_items()
    with pytest.raises(ConfigurationError, match="exactly one item source"):
        iter_items(["a"], items_file="x")


def test_callable_and_generator_sources():
    assert list(iter_items(lambda: (f"item-{i}" for i in range(3)))) == ["item-0", "item-1", "item-2"]
    with pytest.raises(ItemSourceError, match="not an iterable"):
        iter_items(lambda: 42)
    with pytest.raises(ItemSourceError, match="give a list"):
        iter_items("apple banana")


def test_spool_memory_does_not_grow_with_item_count():
    def peak_for(count):
        tracemalloc.start()
        with spool_items(iter_items(lambda: (f"item-{i:08d}" for i in range(count))), ItemEncoder()) as spool:
            for _ in spool.bodies():
                pass
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak

    small, large = peak_for(1_000), peak_for(200_000)
    assert large < small + 1_000_000, (small, large)


def test_a_failing_generator_is_reported():
    def broken():
        yield "a"
        raise RuntimeError("database went away")

    with pytest.raises(ItemSourceError, match="after 1 items: RuntimeError: database went away"):
        spooled(broken)
