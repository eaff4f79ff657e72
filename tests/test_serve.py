"""`reprotune serve`: the real server (Ray Serve) in a subprocess on loopback, driven by NVIDIA's
tritonclient, the standard Open Inference Protocol client, and by plain HTTP where a client would
not send what we want to test (malformed JSON, an oversized body)."""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from fixtures import env, free_port, listening, loopback, require, run, two_node_cluster
from reprotune.evaluation.drift import read_incoming
from reprotune.images import load_image
from reprotune.inference.runtime import onnx_runner

REPROTUNE = str(Path(sys.executable).parent / "reprotune")
MAX_BATCH, MAX_PIXELS = 16, 1_000_000


class Server:
    """A `reprotune serve` process; its output goes to files (a full pipe would stall it). With `group`,
    it leads a process group of its own, as a shell starts a command (`docker stop`, systemd and
    Kubernetes signal such a group)."""

    def __init__(self, model: Path, logs: Path, *args: str, group: bool = False, wait_s: float = 180):
        require("ray", "starts `reprotune serve` (Ray Serve)")
        self.port, self.metrics_port = free_port(), free_port()
        self.url = f"127.0.0.1:{self.port}"
        self.out, self.err = logs / f"serve-{self.port}.out", logs / f"serve-{self.port}.err"
        command = [REPROTUNE, "serve", "--model", str(model), "--port", str(self.port),
                   "--metrics-port", str(self.metrics_port), *args]
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen(command, stdout=out, stderr=err, env=env(), cwd=logs,
                                         process_group=0 if group else None)
        deadline = time.monotonic() + wait_s
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"server did not become ready:\n{self.output()}")
            time.sleep(0.5)

    def _ready(self) -> bool:
        """The health route answers and the server has said so (it prints once its start has returned)."""
        try:
            with urllib.request.urlopen(f"http://{self.url}/v2/health/ready", timeout=5) as reply:
                return reply.status == 200 and "serving " in self.out.read_text()
        except (OSError, urllib.error.URLError):
            return False

    def output(self) -> str:
        return f"stdout:\n{self.out.read_text()[-3000:]}\nstderr:\n{self.err.read_text()[-3000:]}"

    def client(self, concurrency: int = 1) -> triton.InferenceServerClient:
        return triton.InferenceServerClient(self.url, concurrency=concurrency, network_timeout=120)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as reply:
            return reply.read().decode()

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 120) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    """A raw HTTP POST: (status, JSON reply)."""
    request = urllib.request.Request(f"http://{url}", body, headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def image_files(folder: Path) -> list[Path]:
    """Images of different kinds and sizes (RGB, grayscale, transparency, JPEG), as users send them."""
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(7)
    files = []
    for i, (mode, size, suffix) in enumerate([("RGB", (40, 30), ".png"), ("RGB", (64, 48), ".jpg"),
                                             ("L", (32, 32), ".png"), ("RGBA", (50, 70), ".png"),
                                             ("RGB", (33, 33), ".jpg"), ("RGB", (90, 20), ".png")]):
        pixels = rng.integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
        pixels[:, : size[0] // 2] //= 4  # structure, so classes differ between images
        image = Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)
        path = folder / f"image{i}{suffix}"
        image.save(path)
        files.append(path)
    return files


def png_bytes(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 30, 200)).save(buffer, "PNG")
    return buffer.getvalue()


def file_input(blobs: list[bytes], binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("image_file", [len(blobs)], "BYTES")
    tensor.set_data_from_numpy(np.array(blobs, dtype=object), binary_data=binary)
    return tensor


def tensor_input(images: np.ndarray, binary: bool = True, name: str = "image", datatype: str = "FP32"
                 ) -> triton.InferInput:
    tensor = triton.InferInput(name, list(images.shape), datatype)
    tensor.set_data_from_numpy(images, binary_data=binary)
    return tensor


@pytest.fixture(scope="module")
def model(pipeline) -> Path:
    return pipeline / "models" / "model.onnx"


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    requests = tmp_path_factory.mktemp("requests")
    server = Server(model, tmp_path_factory.mktemp("serve"), "--max-batch-size", str(MAX_BATCH),
                    "--max-pixels", str(MAX_PIXELS), "--max-body-mb", "1", "--max-wait-ms", "20",
                    "--log-requests", str(requests))
    server.requests = requests
    yield server
    assert server.stop() == 0, server.output()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[Path]:
    return image_files(tmp_path_factory.mktemp("images"))


@pytest.mark.ray
def test_health_and_metadata_follow_the_protocol_and_the_model_card(server, model):
    card = json.loads((model.parent / "model_card.json").read_text())
    client = server.client()
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("reprotune")
    assert not client.is_model_ready("resnet50")
    metadata = client.get_model_metadata("reprotune")
    side = card["input"]["shape"][2]
    assert {i["name"]: (i["datatype"], i["shape"]) for i in metadata["inputs"]} == {
        "image": ("FP32", [-1, 3, side, side]), "image_file": ("BYTES", [-1])}
    assert metadata["outputs"][0] == {"name": "logits", "datatype": "FP32", "shape": [-1, len(card["classes"])]}
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    with pytest.raises(InferenceServerException, match="unknown model 'resnet50'"):
        client.get_model_metadata("resnet50")


@pytest.mark.ray
def test_the_server_and_its_ray_listen_on_loopback_only(server):
    """No socket of the server's process tree (the CLI, Ray's GCS, raylet, agents, proxy, replicas)
    listens on an address another machine could reach, but one Ray cannot be told about: Serve 2.60's
    replica binds its inter-deployment gRPC server to [::]:0 in code (ray/serve/_private/replica.py,
    `add_port_to_grpc_server(self._server, "[::]:0")`), one per replica."""
    sockets = listening(server.proc.pid)
    assert any(port == server.port for _, port, _ in sockets), sockets
    # Ray titles a worker by what it runs: the actor, then `.method` while a call is in flight.
    exposed = [(ip, process.cmdline()[0].split(".")[0]) for ip, _, process in sockets if not loopback(ip)]
    assert exposed == [("::", "ray::ServeReplica:reprotune:classifier")], exposed


@pytest.mark.ray
def test_image_and_tensor_requests_give_the_classes_reprotune_predict_gives(server, model, files):
    predicted = [json.loads(line) for line in
                 run([REPROTUNE, "predict", "--model", str(model), *map(str, files)], model.parent).stdout.splitlines()]
    expected = [[entry["label"] for entry in row["top_k"]] for row in predicted]
    expected_probabilities = np.array([[entry["probability"] for entry in row["top_k"]] for row in predicted])
    client = server.client()

    by_file = client.infer("reprotune", [file_input([f.read_bytes() for f in files])], request_id="files-1")
    assert by_file.get_response()["id"] == "files-1"
    assert by_file.as_numpy("top_k_labels").astype(str).tolist() == expected
    np.testing.assert_allclose(by_file.as_numpy("top_k_probabilities"), expected_probabilities, atol=1e-5)

    images = np.stack([load_image(f, 32) for f in files]).astype(np.float32) / 255
    for binary in (True, False):  # the binary extension (tritonclient's default) and plain JSON
        outputs = [triton.InferRequestedOutput(name, binary_data=binary)
                   for name in ("logits", "top_k_labels", "top_k_probabilities")]
        by_tensor = client.infer("reprotune", [tensor_input(images, binary)], outputs=outputs)
        assert by_tensor.as_numpy("top_k_labels").astype(str).tolist() == expected
        np.testing.assert_allclose(by_tensor.as_numpy("logits"), by_file.as_numpy("logits"), atol=1e-5)
        np.testing.assert_allclose(by_tensor.as_numpy("logits"), onnx_runner(model)(images), atol=1e-5)

    # Triton's classification extension, compressed requests, and a top_k of 1.
    classified = client.infer("reprotune", [tensor_input(images)], parameters={"top_k": 1},
                              outputs=[triton.InferRequestedOutput("logits", class_count=2),
                                       triton.InferRequestedOutput("top_k_labels")],
                              request_compression_algorithm="gzip")
    assert [row[0].decode().split(":")[2] for row in classified.as_numpy("logits")] == [e[0] for e in expected]
    assert classified.as_numpy("top_k_labels").shape == (len(files), 1)

    # What curl sends: JSON with base64 files (MLServer's content_type convention).
    body = {"inputs": [{"name": "image_file", "shape": [len(files)], "datatype": "BYTES",
                        "parameters": {"content_type": "base64"},
                        "data": [base64.b64encode(f.read_bytes()).decode() for f in files]}]}
    status, reply = post(f"{server.url}/v2/models/reprotune/infer", json.dumps(body).encode())
    assert status == 200
    labels = next(o for o in reply["outputs"] if o["name"] == "top_k_labels")
    assert np.array(labels["data"]).reshape(labels["shape"]).tolist() == expected


@pytest.mark.ray
def test_the_request_log_holds_what_the_model_saw_with_its_prediction(server, model, files):
    before = set(server.requests.glob("*.png"))
    reply = server.client().infer("reprotune", [file_input([f.read_bytes() for f in files])])
    logged = sorted(set(server.requests.glob("*.png")) - before)  # names sort by arrival
    assert len(logged) == len(files)
    for path, png, labels in zip(files, logged, reply.as_numpy("top_k_labels").astype(str).tolist(), strict=True):
        assert np.array_equal(np.asarray(Image.open(png)).transpose(2, 0, 1), load_image(path, 32))
        meta = json.loads(png.with_suffix(".json").read_text())
        assert meta["prediction"] == labels[0] and [e["label"] for e in meta["top"]] == labels[:3]
    card = json.loads((model.parent / "model_card.json").read_text())
    incoming = read_incoming(server.requests, card["classes"], 32)  # what `reprotune monitor` reads
    assert len(incoming.images) == len(list(server.requests.glob("*.png"))) and incoming.labels is None


@pytest.mark.ray
def test_concurrent_requests_are_answered_right_and_batched(server, model, files):
    rng = np.random.default_rng(0)
    images = rng.random((64, 3, 32, 32), dtype=np.float32)
    expected = onnx_runner(model)(images)
    client = server.client(concurrency=64)
    pending = [client.async_infer("reprotune", [tensor_input(images[i:i + 1])], request_id=str(i))
               for i in range(64)]
    for i, request in enumerate(pending):
        result = request.get_result(timeout=120)
        assert result.get_response()["id"] == str(i)
        np.testing.assert_allclose(result.as_numpy("logits")[0], expected[i], atol=1e-4)

    # Ray exports the replicas' metrics every few seconds: wait for this test's 64 requests to show.
    deadline, sizes = time.monotonic() + 60, {}
    while time.monotonic() < deadline:
        text = server.metrics()
        sizes = {key: float(value) for key, value in
                 re.findall(r'^ray_serve_actual_batch_size_(sum|count)\{[^}]*\} (\S+)$', text, re.M)}
        if (sizes.get("count") and _counter(text, "ray_reprotune_images_total") >= 64
                and _counter(text, "ray_serve_num_http_requests_total") >= 64):
            break
        time.sleep(1)
    else:
        pytest.fail(f"metrics never showed the requests; batch sizes seen: {sizes}")
    assert sizes["sum"] / sizes["count"] > 1, f"no batching: {sizes}"
    assert _counter(text, "ray_serve_http_request_latency_ms_count") >= 64


def _counter(text: str, name: str) -> float:
    return sum(float(value) for value in re.findall(rf"^{name}\{{.*\}} (\S+)$", text, re.M))


BINARY_HEADER = json.dumps({"inputs": [{"name": "image", "shape": [1, 3, 32, 32], "datatype": "FP32",
                                        "parameters": {"binary_data_size": 12288}}]}).encode()


def _bad_requests(files: list[Path]) -> dict:
    """Each bad request: (how to send it, the status, a phrase the message must hold)."""
    image = np.zeros((1, 3, 32, 32), np.float32)
    return {
        "wrong input name": (lambda c: c.infer("reprotune", [tensor_input(image, name="pixels")]), 400,
                             "unknown input 'pixels'"),
        "wrong datatype": (lambda c: c.infer("reprotune", [tensor_input(image.astype(np.float64), datatype="FP64")]),
                           400, "must have datatype FP32"),
        "wrong shape": (lambda c: c.infer("reprotune", [tensor_input(np.zeros((1, 3, 28, 28), np.float32))]), 400,
                        "is not [N, 3, 32, 32]"),
        "batch above the limit": (lambda c: c.infer("reprotune", [tensor_input(
            np.zeros((MAX_BATCH + 1, 3, 32, 32), np.float32))]), 400, f"1 to {MAX_BATCH} per request"),
        "not an image": (lambda c: c.infer("reprotune", [file_input([files[0].read_bytes(), b"GIF89a garbage"])]),
                         400, "image_file[1]: not a readable image"),
        "image over the pixel limit": (lambda c: c.infer("reprotune", [file_input([png_bytes(1001, 1000)])]), 400,
                                       f"more than {MAX_PIXELS:,} pixels"),
        "NaN values": (lambda c: c.infer("reprotune", [tensor_input(np.full((1, 3, 32, 32), np.nan, np.float32))]),
                       400, "must be finite"),
        "unknown model": (lambda c: c.infer("resnet50", [tensor_input(image)]), 404, "unknown model 'resnet50'"),
        "unknown version": (lambda c: c.infer("reprotune", [tensor_input(image)], model_version="7"), 404,
                            "unknown version '7'"),
        "unknown output": (lambda c: c.infer("reprotune", [tensor_input(image)],
                                             outputs=[triton.InferRequestedOutput("embedding")]), 400,
                           "unknown output 'embedding'"),
        "malformed JSON": (lambda url: post(url, b'{"inputs": [{"name": "image",'), 400, "malformed JSON"),
        "oversized body": (lambda url: post(url, b"x" * (2**20 + 1)), 413, "over this server's limit"),
        "oversized once inflated": (lambda url: post(url, gzip.compress(b" " * (2**20 + 1)),
                                                     {"Content-Encoding": "gzip"}), 413, "inflates to more"),
        "binary size past the body": (lambda url: post(url, BINARY_HEADER + bytes(100),
                                                       {"Inference-Header-Content-Length": str(len(BINARY_HEADER))}),
                                      400, "binary_data_size 12288 is more than the 100 bytes"),
    }


@pytest.mark.ray
@pytest.mark.reliability
@pytest.mark.parametrize("case", list(_bad_requests([Path("unused")])))
def test_each_bad_request_gets_a_4xx_naming_it_and_the_next_request_succeeds(server, files, case):
    send, status, phrase = _bad_requests(files)[case]
    client = server.client()
    if send.__code__.co_varnames[0] == "url":
        got, reply = send(f"{server.url}/v2/models/reprotune/infer")
        assert (got, phrase in reply["error"]) == (status, True), reply
    else:
        with pytest.raises(InferenceServerException) as error:
            send(client)
        assert error.value.status() == str(status) and phrase in error.value.message(), error.value
    good = client.infer("reprotune", [file_input([files[0].read_bytes()])])
    assert good.as_numpy("top_k_labels").shape == (1, 3)


@pytest.mark.ray
@pytest.mark.reliability
def test_sigterm_answers_the_requests_in_flight_then_exits_0(model, files, tmp_path):
    # Batches wait up to 3 s to fill: requests sent just before SIGTERM are still in flight when it comes.
    server = Server(model, tmp_path, "--max-wait-ms", "3000", "--max-batch-size", "64")
    client = server.client(concurrency=8)
    blob = files[1].read_bytes()
    pending = [client.async_infer("reprotune", [file_input([blob])]) for _ in range(8)]
    time.sleep(1)
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    for request in pending:
        assert request.get_result(timeout=60).as_numpy("top_k_labels").shape == (1, 3)
    assert server.stop() == 0, server.output()
    assert "answering the requests in flight" in server.err.read_text()
    print(f"drained and stopped in {time.monotonic() - started:.1f} s")
    ray_left = subprocess.run(["pgrep", "-f", f"raylet.*{server.metrics_port}"], capture_output=True)
    assert ray_left.returncode == 1, "Ray processes outlived the server"


@pytest.mark.ray
@pytest.mark.reliability
@pytest.mark.parametrize("to", ["process", "group"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_the_server_or_its_process_group_stops_it_cleanly(model, tmp_path, signum, to):
    """Ctrl-C sends SIGINT to the terminal's process group; `docker stop`, systemd and Kubernetes send
    SIGTERM to the server or its group. Each is a clean stop: exit 0 within the 10 s the README promises,
    nothing on stdout or stderr but the server's two lines and, on a busy machine, its "waiting for Ray
    Serve to start" progress (not Ray's "graceful_shutdown failed", nor
    "Failed to connect to GCS" after a minute: Ray's processes got the group's SIGTERM), and no Ray
    process left."""
    server = Server(model, tmp_path, group=to == "group")
    ray_processes = psutil.Process(server.proc.pid).children(recursive=True)
    assert any("raylet" in p.name() for p in ray_processes), ray_processes
    started = time.monotonic()
    (os.killpg if to == "group" else os.kill)(server.proc.pid, signum)
    code = server.stop(timeout=60)  # waits; kills only if it is still there after a minute
    seconds = time.monotonic() - started
    assert (code, seconds < 10) == (0, True), f"exit {code} after {seconds:.1f} s\n{server.output()}"
    out, err = server.out.read_text().splitlines(), server.err.read_text().splitlines()
    err = [line for line in err if not line.startswith("waiting for Ray Serve to start (")]  # a slow start's
    assert len(out) == 1 and out[0].startswith("serving "), server.output()
    assert err == ["stopping: answering the requests in flight"], server.output()
    _, alive = psutil.wait_procs(ray_processes, timeout=10)
    assert not alive, f"Ray processes outlived the server: {alive}"


@pytest.mark.ray
@pytest.mark.reliability
def test_a_start_on_a_busy_machine_is_slow_not_fatal(model, tmp_path):
    """A busy machine starts Ray Serve's HTTP proxy slowly, and Ray Serve's controller gave a new proxy
    3 x 5 s to be ready, then killed it: the start failed with ActorDiedError. Here, as the proxy
    starts, every core is kept busy (a spinning process per core, in this test's session, as the
    server is: Linux shares the CPU between sessions first, so spinners elsewhere would barely slow
    it) and the proxy itself is frozen (SIGSTOP) for 20 s, so that it is surely later than those 15 s
    however fast the machine. The server waits, says so every 15 s, and answers. (Spinners through the
    whole start show the same at two to four times the cost: 100-260 s here.)"""
    cores = len(os.sched_getaffinity(0))
    frozen = threading.Event()
    done = threading.Event()

    def freeze_the_proxy() -> None:
        while not done.is_set():
            for process in psutil.Process().children(recursive=True):
                try:
                    if "ProxyActor" in " ".join(process.cmdline()):
                        process.suspend()
                        frozen.set()
                        spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                                    for _ in range(cores)]
                        done.wait(20)
                        for spinner in spinners:
                            spinner.kill()
                            spinner.wait()
                        process.resume()
                        return
                except psutil.Error:
                    continue
            time.sleep(0.05)

    freezer = threading.Thread(target=freeze_the_proxy, daemon=True)
    freezer.start()
    started = time.monotonic()
    try:
        server = Server(model, tmp_path, "--start-timeout-s", "600", wait_s=600)
    finally:
        done.set()
        freezer.join()
    seconds = time.monotonic() - started
    try:
        assert frozen.is_set(), "the proxy was never seen starting"
        assert server.client().is_server_ready()
        waited = re.findall(r"^waiting for Ray Serve to start \(\d+ s of 600 s\)\.\.\.$", server.err.read_text(), re.M)
        assert waited, f"no progress line in a {seconds:.0f} s start:\n{server.output()}"
        print(f"ready under load after {seconds:.0f} s")
    finally:
        assert server.stop() == 0, server.output()


@pytest.mark.ray
@pytest.mark.reliability
def test_a_start_past_its_limit_fails_in_one_line(model, tmp_path):
    require("ray", "starts `reprotune serve` (Ray Serve)")
    port, metrics_port = free_port(), free_port()
    failed = run([REPROTUNE, "serve", "--model", str(model), "--port", str(port), "--metrics-port",
                  str(metrics_port), "--start-timeout-s", "1"], tmp_path, check=False, timeout=120)
    assert failed.returncode == 1, failed
    assert failed.stderr.splitlines() == [
        "reprotune: error: serve: Ray Serve did not start within 1 s (--start-timeout-s); a busy machine "
        "starts it slowly: allow more, or free some CPU"], failed.stderr
    assert failed.stdout == ""
    ray_left = subprocess.run(["pgrep", "-f", f"raylet.*{metrics_port}"], capture_output=True)
    assert ray_left.returncode == 1, "Ray processes outlived the server"


def test_bad_setup_fails_in_one_line_before_ray_starts(model, tmp_path):
    missing = run([REPROTUNE, "serve", "--model", str(tmp_path / "none.onnx")], tmp_path, check=False)
    assert missing.returncode == 1 and missing.stderr.strip().splitlines() == [
        f"reprotune: error: {tmp_path / 'none.onnx'}: model not found (run `make demo` or `dvc repro` first)"]
    (tmp_path / "stray.onnx").write_bytes(model.read_bytes())
    no_card = run([REPROTUNE, "serve", "--model", str(tmp_path / "stray.onnx")], tmp_path, check=False)
    assert no_card.returncode == 1 and "no valid model_card.json" in no_card.stderr
    assert len(no_card.stderr.strip().splitlines()) == 1


@pytest.mark.ray
def test_two_replicas_on_a_two_node_loopback_cluster_both_answer(model, tmp_path):
    # Serve's proxy prefers replicas on its own node and spilled to the other one only sometimes here;
    # with plain power-of-two-choices routing, every replica takes requests.
    with two_node_cluster(tmp_path, {"RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0"}) as (address, _, _):
        # Serve routes to the proxy's own node first and spills to others when a replica is full. A
        # replica takes at most 2 x 4 requests at once here, and each waits up to 1 s for its batch of 4
        # to fill: 32 concurrent requests fill the head's replica however fast the machine is.
        server = Server(model, tmp_path, "--address", address, "--replicas", "2", "--threads", "1",
                        "--max-batch-size", "4", "--max-wait-ms", "1000")
        try:
            client = server.client(concurrency=32)
            images = np.random.default_rng(1).random((1, 3, 32, 32), dtype=np.float32)
            answered: set = set()
            deadline = time.monotonic() + 90  # rounds of 32 at once, until both nodes have answered
            while len({node for node, _ in answered}) < 2 and time.monotonic() < deadline:
                answered |= {(reply["parameters"]["node"], reply["parameters"]["replica"])
                             for reply in (request.get_result(timeout=120).get_response() for request in
                                           [client.async_infer("reprotune", [tensor_input(images)])
                                            for _ in range(32)])}
            nodes = {node for node, _ in answered}
            assert len(nodes) == 2 and len(answered) == 2, f"answered by {answered}"
        finally:
            assert server.stop() == 0, server.output()


@pytest.mark.parametrize(("address", "host", "local"), [
    (None, "127.0.0.1", True), ("127.0.0.1:6379", "127.0.0.1", True), ("[::1]:6379", "::1", True),
    (None, "0.0.0.0", False), ("10.0.0.5:6379", "127.0.0.1", False), ("head.example:6379", "127.0.0.1", False)])
def test_ray_is_kept_on_loopback_only_when_the_cluster_and_the_server_are(address, host, local):
    code = ("import os; from reprotune.inference.cluster import ray_environment; "
            f"ray_environment({address!r}, {host!r}); "
            "print(os.environ['RAY_USAGE_STATS_ENABLED'], os.environ.get('RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER'))")
    environ = {k: v for k, v in env().items() if not k.startswith("RAY_")}
    out = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, check=True
                         ).stdout.split()
    assert out == ["0", "0" if local else "None"]


@pytest.mark.reliability
def test_the_server_wakes_for_a_signal_another_thread_received(tmp_path):
    """The kernel gives a signal sent to the process to any of its threads (the server has Ray's); Python
    runs the handler in the main thread only when that thread wakes. Here the signal goes to a thread
    sleeping in C, as Ray's do, while the main thread waits for it: the wait must still end. (Waiting
    without a timeout, the server sat out a SIGINT until the test killed it a minute later.)"""
    script = """
import signal, threading, time
from reprotune.inference.server import wait_for
stop = threading.Event()
signal.signal(signal.SIGINT, lambda *_: stop.set())
sleeper = threading.Thread(target=time.sleep, args=(60,), daemon=True)
sleeper.start()
threading.Timer(0.5, signal.pthread_kill, (sleeper.ident, signal.SIGINT)).start()
wait_for(stop)
print("woke")
"""
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=20,
                              env=env(), cwd=tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail("the main thread never woke to run the handler of a signal another thread received")
    assert (done.returncode, done.stdout.strip()) == (0, "woke"), done.stderr
