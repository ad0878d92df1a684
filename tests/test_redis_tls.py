"""A managed Redis speaks TLS (`rediss://`): memory and the gate work over it, from REDIS_URL.

The test starts its own redis-server with a TLS port and a throwaway self-signed certificate,
as a provider like Heroku's would present.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time

import pytest
import redis

from bot.gate import Sender, Verdict, open_gate
from bot.memory import ChannelKey, RedisMemory, Turn, connect_redis, open_memory
from tests.platform_helpers import free_port
from training.persona import Persona


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory):
    for tool in ("redis-server", "openssl"):
        assert shutil.which(tool), f"{tool} is needed to start a TLS Redis for this test"
    folder = tmp_path_factory.mktemp("tls-redis")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert),
         "--tls-auth-clients", "no", "--save", "", "--appendonly", "no", "--dir", str(folder)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    url = f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=none"  # self-signed, as on Heroku
    deadline = time.monotonic() + 10
    while True:
        try:
            client = redis.Redis.from_url(url)
            client.ping()
            client.close()
            break
        except redis.ConnectionError:
            assert server.poll() is None, f"redis-server with TLS did not start: {server.stderr.read()}"
            assert time.monotonic() < deadline, "redis-server with TLS did not answer"
            time.sleep(0.05)
    yield url
    server.terminate()
    server.wait(10)


def test_memory_and_gate_over_rediss(tls_redis):
    persona = Persona(name="Sam")

    async def scenario():
        client = connect_redis(tls_redis)  # one pool for the process, as `clone serve` opens it
        memory = open_memory(client, None)
        gate = open_gate(persona, redis=client)
        try:
            assert isinstance(memory, RedisMemory) and gate.state.client is client
            key = ChannelKey(persona.id, "telegram", "1")
            assert await memory.append(key, [Turn("u1", "Ana", "hi over tls", False, 1.0)])
            turns, _ = await memory.recall(key)
            message = Sender("telegram", "u1", "1", "42")
            return [t.text for t in turns], await gate.admit(message), await gate.admit(message)
        finally:
            await memory.close()
            await gate.close()
            await client.aclose()

    texts, first, second = asyncio.run(scenario())
    assert texts == ["hi over tls"]
    assert (first, second) == (Verdict.ANSWER, Verdict.DUPLICATE)


def test_a_plain_client_cannot_talk_to_the_tls_port(tls_redis):
    plain = tls_redis.replace("rediss://", "redis://").split("?")[0]
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(plain, socket_timeout=1, socket_connect_timeout=1).ping()
