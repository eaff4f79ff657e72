"""The Open Inference Protocol (KServe V2) for an exported classifier: parsing requests, encoding replies.

No web framework and no Ray here: `reprotune.inference.server` hands over the body's bytes and gets bytes back,
so every rule below is tested in-process, and clients written for KServe, Triton or MLServer work.

- Inputs: exactly one per request, either `image` (FP32, shape [N, 3, size, size], RGB in [0, 1]: the
  model card's contract) or `image_file` (BYTES, shape [N] or [N, 1]: encoded PNG/JPEG/... files,
  decoded as `reprotune predict` decodes them). N is at most the server's batch limit.
- Tensor data travels as JSON (`data`, flat or nested) or, as tritonclient sends it by default, in
  Triton's binary tensor data extension: the JSON header's length in the `Inference-Header-Content-Length`
  HTTP header, then each input's raw bytes (`parameters.binary_data_size`; BYTES elements each as a
  little-endian uint32 length and the bytes). JSON BYTES elements are UTF-8 text, or base64 with the
  input parameter `content_type: base64` (MLServer's convention), which is how curl sends a file.
- Outputs: `logits` FP32 [N, classes], `top_k_labels` BYTES [N, k], `top_k_probabilities` FP32 [N, k];
  k is the request parameter `top_k` (default 3). An output asked for with `binary_data: true` (or
  every output, with the request parameter `binary_data_output: true`) comes back binary; one asked
  for with `classification: k` comes back as Triton's k strings "score:index:label" per image.
- Anything else is a ProtocolError: a status (400, 404 or 413) and a message that names the problem.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass, field

import numpy as np

from reprotune.errors import ReprotuneError
from reprotune.images import load_image
from reprotune.inference.runtime import softmax

TENSOR, FILES = "image", "image_file"  # the two ways to send images
LOGITS, LABELS, PROBABILITIES = "logits", "top_k_labels", "top_k_probabilities"
OUTPUTS = (LOGITS, LABELS, PROBABILITIES)
DEFAULT_TOP_K = 3
HEADER_LENGTH = "inference-header-content-length"  # Triton's binary extension (HTTP header)


class ProtocolError(Exception):
    """A request the server refuses: HTTP `status`, and a message naming what is wrong."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Contract:
    """What the served model takes and gives, and the server's limits."""

    name: str
    version: str
    classes: list[str]
    size: int
    max_batch_size: int
    max_pixels: int

    def metadata(self) -> dict:
        """The protocol's model metadata (GET /v2/models/NAME)."""
        return {
            "name": self.name, "versions": [self.version], "platform": "onnxruntime_onnx",
            "inputs": [{"name": TENSOR, "datatype": "FP32", "shape": [-1, 3, self.size, self.size]},
                       {"name": FILES, "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": LOGITS, "datatype": "FP32", "shape": [-1, len(self.classes)]},
                        {"name": LABELS, "datatype": "BYTES", "shape": [-1, -1]},
                        {"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, -1]}],
        }

    def check_model(self, name: str, version: str | None = None) -> None:
        """404 unless the URL names this model (and this version, if it names one)."""
        if name != self.name:
            raise ProtocolError(f"unknown model {name!r} (this server serves {self.name!r})", 404)
        if version is not None and version != self.version:
            raise ProtocolError(f"unknown version {version!r} of model {name!r} (this server has "
                                f"{self.version!r})", 404)


@dataclass
class Output:
    name: str
    binary: bool = False
    classification: int = 0  # Triton's classification extension: k "score:index:label" strings


@dataclass
class Request:
    """A parsed inference request: either `images` (float32 N x 3 x size x size) or `files`."""

    id: str | None
    images: np.ndarray | None
    files: list[bytes] | None
    top_k: int
    outputs: list[Output] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images) if self.images is not None else len(self.files)


def parse_request(body: bytes, header_length: str | None, contract: Contract) -> Request:
    """An inference request's body (and its `Inference-Header-Content-Length`, if any) -> Request."""
    header, binary = _split(body, header_length)
    try:
        request = json.loads(header)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"malformed JSON in the request ({exc})") from None
    if not isinstance(request, dict):
        raise ProtocolError("the request must be a JSON object with an `inputs` list")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ProtocolError(f"the request must have exactly one input: {TENSOR!r} (FP32 "
                            f"[N, 3, {contract.size}, {contract.size}]) or {FILES!r} (BYTES [N], image files)")
    parameters = _object(request.get("parameters", {}), "the request's parameters")
    tensor = inputs[0]
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if name not in (TENSOR, FILES):
        raise ProtocolError(f"unknown input {name!r}: this model takes {TENSOR!r} (FP32 "
                            f"[N, 3, {contract.size}, {contract.size}]) or {FILES!r} (BYTES [N], image files)")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ProtocolError(f"input {name!r}: shape must be a list of non-negative integers (got {shape!r})")
    wanted = "FP32" if name == TENSOR else "BYTES"
    if datatype != wanted:
        raise ProtocolError(f"input {name!r} must have datatype {wanted} (got {datatype!r})")
    expected = [3, contract.size, contract.size] if name == TENSOR else ([], [1])
    if (name == TENSOR and shape[1:] != expected) or (name == FILES and shape[1:] not in expected) or not shape:
        want = f"[N, 3, {contract.size}, {contract.size}]" if name == TENSOR else "[N] or [N, 1]"
        raise ProtocolError(f"input {name!r}: shape {shape} is not {want}")
    count = shape[0]
    if not 1 <= count <= contract.max_batch_size:
        raise ProtocolError(f"input {name!r}: a batch of {count} images is outside this server's limit "
                            f"(1 to {contract.max_batch_size} per request)")
    data = _tensor_data(tensor, binary)
    images = files = None
    if name == TENSOR:
        images = _floats(data, shape)
    else:
        files = _files(data, count, _object(tensor.get("parameters", {}), f"input {name!r}'s parameters"))
    if binary:
        raise ProtocolError(f"{len(binary)} bytes of binary data after the inputs' declared binary_data_size")
    return Request(id=_request_id(request), images=images, files=files, top_k=_top_k(parameters, contract),
                   outputs=_outputs(request.get("outputs"), parameters, contract))


def decode_files(files: list[bytes], contract: Contract) -> np.ndarray:
    """Encoded image files -> float32 (N, 3, size, size) in [0, 1], decoded as `reprotune predict` does."""
    images = np.empty((len(files), 3, contract.size, contract.size), np.float32)
    for i, data in enumerate(files):
        try:
            images[i] = load_image(f"image_file[{i}]", contract.size, data, max_pixels=contract.max_pixels)
        except ReprotuneError as exc:
            raise ProtocolError(str(exc)) from None
    return images / 255


def encode_response(request: Request, logits: np.ndarray, contract: Contract, parameters: dict | None = None
                    ) -> tuple[bytes, dict[str, str]]:
    """The reply's body and extra HTTP headers (the binary extension's, when any output is binary)."""
    probabilities = softmax(logits)
    best = np.argsort(-probabilities, axis=1, kind="stable")[:, :request.top_k]
    values = {
        LOGITS: ("FP32", logits.astype(np.float32)),
        LABELS: ("BYTES", np.array([[contract.classes[i] for i in row] for row in best], dtype=object)),
        PROBABILITIES: ("FP32", np.take_along_axis(probabilities, best, 1).astype(np.float32)),
    }
    outputs, chunks = [], []
    for output in request.outputs or [Output(name) for name in OUTPUTS]:
        datatype, value = values[output.name]
        if output.classification:
            datatype, value = "BYTES", _classification(value.astype(np.float32), output.classification, contract)
        entry = {"name": output.name, "datatype": datatype, "shape": list(value.shape)}
        if output.binary:
            chunk = _bytes_binary(value.ravel()) if datatype == "BYTES" else value.astype("<f4").tobytes()
            entry["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        else:
            entry["data"] = value.ravel().tolist()
        outputs.append(entry)
    reply = {"model_name": contract.name, "model_version": contract.version, "outputs": outputs}
    if request.id is not None:
        reply["id"] = request.id
    if parameters:
        reply["parameters"] = parameters
    header = json.dumps(reply, separators=(",", ":")).encode()
    if not chunks:
        return header, {"content-type": "application/json"}
    return header + b"".join(chunks), {"content-type": "application/octet-stream",
                                       HEADER_LENGTH: str(len(header))}


def error_body(message: str) -> bytes:
    """The protocol's error reply: {"error": message}."""
    return json.dumps({"error": message}).encode()


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytearray]:
    """(JSON header, binary part) per the binary extension; all JSON without its header."""
    if header_length is None:
        return body, bytearray()
    try:
        length = int(header_length)
    except ValueError:
        length = -1
    if not 0 <= length <= len(body):
        raise ProtocolError(f"Inference-Header-Content-Length {header_length!r} is not a length within the "
                            f"body's {len(body)} bytes")
    return body[:length], bytearray(body[length:])


def _object(value, what: str) -> dict:
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be a JSON object (got {type(value).__name__})")
    return value


def _tensor_data(tensor: dict, binary: bytearray):
    """The input's `data`, or its bytes taken off the front of the binary part."""
    parameters = _object(tensor.get("parameters", {}), f"input {tensor['name']!r}'s parameters")
    size = parameters.get("binary_data_size")
    if size is None:
        if "data" not in tensor:
            raise ProtocolError(f"input {tensor['name']!r} has neither `data` nor `parameters.binary_data_size`")
        return tensor["data"]
    if type(size) is not int or not 0 <= size <= len(binary):
        raise ProtocolError(f"input {tensor['name']!r}: binary_data_size {size!r} is more than the "
                            f"{len(binary)} bytes of binary data in the request")
    chunk = bytes(binary[:size])
    del binary[:size]
    return chunk


def _floats(data, shape: list[int]) -> np.ndarray:
    expected = math.prod(shape)
    if isinstance(data, bytes):
        if len(data) != 4 * expected:
            raise ProtocolError(f"input {TENSOR!r}: {len(data)} bytes of FP32 data for shape {shape} "
                                f"(needs {4 * expected})")
        array = np.frombuffer(data, "<f4").astype(np.float32)
    else:
        try:
            array = np.asarray(data, dtype=np.float32).ravel()
        except (ValueError, TypeError):
            raise ProtocolError(f"input {TENSOR!r}: `data` must be numbers (FP32)") from None
        if array.size != expected:
            raise ProtocolError(f"input {TENSOR!r}: {array.size} values for shape {shape} (needs {expected})")
    if not np.isfinite(array).all():
        raise ProtocolError(f"input {TENSOR!r}: values must be finite (found NaN or infinity)")
    return array.reshape(shape)


def _files(data, count: int, parameters: dict) -> list[bytes]:
    if isinstance(data, bytes):
        files, offset = [], 0
        while offset < len(data):
            if offset + 4 > len(data):
                raise ProtocolError(f"input {FILES!r}: truncated BYTES element length in the binary data")
            (length,) = struct.unpack_from("<I", data, offset)
            if offset + 4 + length > len(data):
                raise ProtocolError(f"input {FILES!r}: a BYTES element of {length} bytes runs past the binary data")
            files.append(data[offset + 4:offset + 4 + length])
            offset += 4 + length
    else:
        flat = _flatten(data)
        if not all(isinstance(item, str) for item in flat):
            raise ProtocolError(f"input {FILES!r}: JSON `data` must be strings (base64 with "
                                f"parameters.content_type 'base64')")
        if parameters.get("content_type") == "base64":
            try:
                files = [base64.b64decode(item, validate=True) for item in flat]
            except (binascii.Error, ValueError):
                raise ProtocolError(f"input {FILES!r}: `data` is not valid base64") from None
        else:
            files = [item.encode("utf-8") for item in flat]
    if len(files) != count:
        raise ProtocolError(f"input {FILES!r}: {len(files)} elements for a batch of {count}")
    return files


def _flatten(data) -> list:
    if not isinstance(data, list):
        return [data]
    return [leaf for item in data for leaf in _flatten(item)]


def _request_id(request: dict) -> str | None:
    value = request.get("id")
    if value is not None and not isinstance(value, str):
        raise ProtocolError(f"the request's id must be a string (got {type(value).__name__})")
    return value


def _top_k(parameters: dict, contract: Contract) -> int:
    top_k = parameters.get("top_k", min(DEFAULT_TOP_K, len(contract.classes)))
    if type(top_k) is not int or not 1 <= top_k <= len(contract.classes):
        raise ProtocolError(f"parameter top_k must be an integer from 1 to {len(contract.classes)} (got {top_k!r})")
    return top_k


def _outputs(requested, parameters: dict, contract: Contract) -> list[Output]:
    all_binary = parameters.get("binary_data_output") is True
    if requested is None:
        return [Output(name, all_binary) for name in OUTPUTS]
    if not isinstance(requested, list) or not all(isinstance(o, dict) for o in requested):
        raise ProtocolError("the request's `outputs` must be a list of objects with a `name`")
    outputs = []
    for entry in requested:
        name = entry.get("name")
        if name not in OUTPUTS:
            raise ProtocolError(f"unknown output {name!r}: this model gives {', '.join(OUTPUTS)}")
        options = _object(entry.get("parameters", {}), f"output {name!r}'s parameters")
        classification = options.get("classification", 0)
        if type(classification) is not int or not 0 <= classification <= len(contract.classes):
            raise ProtocolError(f"output {name!r}: classification must be an integer from 0 to "
                                f"{len(contract.classes)} (got {classification!r})")
        if classification and name != LOGITS:
            raise ProtocolError(f"output {name!r}: ask {LOGITS!r} for a classification (scores of every class)")
        outputs.append(Output(name, options.get("binary_data", all_binary) is True, classification))
    return outputs


def _classification(scores: np.ndarray, k: int, contract: Contract) -> np.ndarray:
    """Triton's classification extension: per row, the k best as "score:index:label" (best first)."""
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.array([[f"{row[i]:f}:{i}:{contract.classes[i]}" for i in order]
                     for row, order in zip(scores, best, strict=True)], dtype=object)


def _bytes_binary(values: np.ndarray) -> bytes:
    """BYTES elements in the binary extension: each a little-endian uint32 length, then its bytes."""
    encoded = [v if isinstance(v, bytes) else str(v).encode() for v in values]
    return b"".join(struct.pack("<I", len(e)) + e for e in encoded)
