"""The server helper of evaluation and serving: a server that dies while it starts is started once more, with a
warning that quotes why, and a death that repeats is an error naming the cause found in its log, not only
the log's last lines."""

from __future__ import annotations

import sys

import pytest

from eval.servers import failure_excerpt, free_port, server
from toolkit.errors import ToolkitError

# Listens on the port given, answers /health, and prints a line per start to a counter file; with a count
# below FAILS it exits instead, the way an engine that dies while it starts does.
FLAKY = """
import http.server, sys
port, counter, fails = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
with open(counter, "a") as f:
    f.write("start\\n")
if open(counter).read().count("start") <= fails:
    print("(EngineCore pid=1) ERROR EngineCore failed to start: out of memory", flush=True)
    print("filler\\n" * 2000, flush=True)
    sys.exit(1)

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass

http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""


def flaky_argv(tmp_path, port: int, fails: int) -> list[str]:
    script = tmp_path / "flaky.py"
    script.write_text(FLAKY)
    return [sys.executable, str(script), str(port), str(tmp_path / "starts"), str(fails)]


def test_a_server_that_dies_while_starting_is_started_again(tmp_path):
    port, log = free_port(), tmp_path / "server.log"
    with pytest.warns(RuntimeWarning, match=r"(?s)exited 1 before serving.*out of memory"):
        with server(flaky_argv(tmp_path, port, fails=1), port, log, start_s=60) as url:
            assert url == f"http://127.0.0.1:{port}"
    assert (tmp_path / "starts").read_text().count("start") == 2
    assert "out of memory" in (tmp_path / "server.log.1").read_text()


def test_a_death_that_repeats_is_an_error_naming_its_cause(tmp_path):
    port, log = free_port(), tmp_path / "server.log"
    with pytest.warns(RuntimeWarning), pytest.raises(ToolkitError) as raised:
        with server(flaky_argv(tmp_path, port, fails=2), port, log, start_s=60):
            pytest.fail("the server never answered")
    message = str(raised.value)
    # The cause sits 2000 lines before the end: the excerpt finds it, the log's tail alone would not.
    assert (
        "exited 1 before serving" in message and "ERROR EngineCore failed to start: out of memory" in message
    )
    assert (tmp_path / "starts").read_text().count("start") == 2


def test_the_excerpt_leads_with_the_lines_naming_the_cause():
    text = "\n".join(
        ["INFO starting"] + ["noise"] * 500 + ["RuntimeError: Failed core proc(s): {'EngineCore': -9}"]
    )
    excerpt = failure_excerpt(text, tail=100)
    assert excerpt.startswith(
        "lines naming the cause:\nRuntimeError: Failed core proc(s): {'EngineCore': -9}"
    )
    assert "INFO starting" not in excerpt
    assert failure_excerpt("all quiet", tail=100) == "its end:\nall quiet"


def test_a_vllm_server_does_not_inherit_a_disabled_torch_compile():
    """`vllm serve` fails at start under TORCHDYNAMO_DISABLE (its AOT compile), which this suite sets for its
    own processes (tests/conftest.py): the servers started for vLLM get the environment without it."""
    import os

    from export.verify_vllm import server_environ

    assert os.environ.get("TORCHDYNAMO_DISABLE") == "1"
    env = server_environ(VLLM_CPU_KVCACHE_SPACE="1")
    assert "TORCHDYNAMO_DISABLE" not in env and env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert env["PATH"] == os.environ["PATH"]
