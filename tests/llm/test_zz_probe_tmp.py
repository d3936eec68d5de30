import pytest
from tests.fake_upstream import Reply, FakeUpstream
from tests.llm.ws_client import open_socket, generate, until_end, text_of, wait_for_status, reply_text
pytestmark = pytest.mark.django_db(transaction=True)

class OneWrite(FakeUpstream):
    """Sends the whole SSE body in one write (as a proxy flushing a buffer would)."""
    async def _raw(self, writer, data):
        self._pending = getattr(self, "_pending", b"") + data
    async def _end(self, writer):
        d = getattr(self, "_pending", b"")
        writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(d), d)); self._pending = b""
        await writer.drain()

@pytest.mark.parametrize("kind", ["error_after", "invalid_after"])
async def test_probe(llm_config, kind):
    fake = OneWrite(Reply(tokens=["a", "b", "c", "d", "e"], **{kind: 3}))
    url = await fake.start()
    llm_config(idle_timeout=0.5, max_retries=1, retry_delay=0, lm_studio={"base_url": url, "default_model": ""})
    comm = await open_socket()
    await generate(comm)
    frames = await until_end(comm)
    print(kind, repr(text_of(frames)), frames[-1])
    s, m = await wait_for_status(frames[-1]["session_id"], "failed")
    print(s.status, repr(reply_text(m)))
    await comm.disconnect()
    await fake.stop()
    assert text_of(frames) == "abc"
