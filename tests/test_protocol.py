"""The Open Inference Protocol codec in-process: what tests/test_serve.py cannot reach cheaply through a
server (every malformed variant), checked against tritonclient's own encoders and decoders."""

from __future__ import annotations

import base64
import io
import json
import struct

import numpy as np
import pytest
from PIL import Image
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from reprotune.inference.protocol import Contract, ProtocolError, decode_files, encode_response, parse_request

CONTRACT = Contract("m", "v1", [f"class{i}" for i in range(5)], 4, max_batch_size=3, max_pixels=10_000)


def tensor(name="image", shape=(1, 3, 4, 4), datatype="FP32", **fields) -> dict:
    return {"name": name, "shape": list(shape), "datatype": datatype, **fields}


def parse(request: dict, binary: bytes = b"") -> object:
    header = json.dumps(request).encode()
    return parse_request(header + binary, str(len(header)) if binary else None, CONTRACT)


def png(width=6, height=5) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def test_fp32_data_nested_flat_or_binary_parse_to_the_same_images():
    images = np.random.default_rng(0).random((2, 3, 4, 4), dtype=np.float32)
    nested = parse({"inputs": [tensor(shape=images.shape, data=images.tolist())]})
    flat = parse({"inputs": [tensor(shape=images.shape, data=images.ravel().tolist())]})
    binary = parse({"inputs": [tensor(shape=images.shape, parameters={"binary_data_size": images.nbytes})]},
                   images.tobytes())
    for request in (nested, flat, binary):
        np.testing.assert_array_equal(request.images, images)
        assert request.files is None and len(request) == 2 and request.top_k == 3


def test_bytes_elements_parse_from_tritonclients_binary_form_and_from_base64_json():
    blobs = [png(), png(8, 8)]
    serialized = serialize_byte_tensor(np.array(blobs, dtype=object)).item()
    size = {"binary_data_size": len(serialized)}
    binary = parse({"inputs": [tensor("image_file", [2, 1], "BYTES", parameters=size)]}, serialized)
    as_base64 = parse({"inputs": [tensor("image_file", [2], "BYTES", parameters={"content_type": "base64"},
                                         data=[base64.b64encode(b).decode() for b in blobs])]})
    assert binary.files == as_base64.files == blobs
    images = decode_files(binary.files, CONTRACT)
    assert images.shape == (2, 3, 4, 4) and images.dtype == np.float32
    np.testing.assert_allclose(images[0, :, 0, 0], np.array([10, 200, 30]) / 255)


@pytest.mark.parametrize(("request_", "binary", "phrase"), [
    ([], b"", "JSON object"),
    ({"inputs": []}, b"", "exactly one input"),
    ({"inputs": [tensor(), tensor()]}, b"", "exactly one input"),
    ({"inputs": [tensor(shape=[1, 3, 4])]}, b"", "is not [N, 3, 4, 4]"),
    ({"inputs": [tensor(shape=[1, 3, 4, -4])]}, b"", "non-negative integers"),
    ({"inputs": [tensor(shape=[0, 3, 4, 4], data=[])]}, b"", "a batch of 0 images"),
    ({"inputs": [tensor(shape=[4, 3, 4, 4])]}, b"", "a batch of 4 images"),
    ({"inputs": [tensor()]}, b"", "neither `data` nor"),
    ({"inputs": [tensor(data=[1.0] * 47)]}, b"", "47 values for shape"),
    ({"inputs": [tensor(data=["a"] * 48)]}, b"", "must be numbers"),
    ({"inputs": [tensor(data=[float("inf")] * 48)]}, b"", "must be finite"),
    ({"inputs": [tensor(parameters={"binary_data_size": 8})]}, bytes(8), "8 bytes of FP32 data"),
    ({"inputs": [tensor(parameters={"binary_data_size": 192})]}, bytes(200), "8 bytes of binary data after"),
    ({"inputs": [tensor(parameters={"binary_data_size": "192"})]}, bytes(192), "binary_data_size '192'"),
    ({"inputs": [tensor("image_file", [1], "BYTES", data=[1])]}, b"", "must be strings"),
    ({"inputs": [tensor("image_file", [1], "BYTES", data=["@@"], parameters={"content_type": "base64"})]}, b"",
     "not valid base64"),
    ({"inputs": [tensor("image_file", [2], "BYTES", data=["a"])]}, b"", "1 elements for a batch of 2"),
    ({"inputs": [tensor("image_file", [1], "BYTES", parameters={"binary_data_size": 6})]}, struct.pack("<I", 9) + b"ab",
     "runs past the binary data"),
    ({"inputs": [tensor("image_file", [1], "BYTES", parameters={"binary_data_size": 2})]}, b"ab",
     "truncated BYTES element length"),
    ({"inputs": [tensor("image_file", [1, 2], "BYTES", data=["a", "b"])]}, b"", "is not [N] or [N, 1]"),
    ({"inputs": [tensor(data=[0.0] * 48)], "parameters": {"top_k": 6}}, b"", "top_k must be an integer from 1 to 5"),
    ({"inputs": [tensor(data=[0.0] * 48)], "parameters": {"top_k": True}}, b"", "top_k must be an integer"),
    ({"inputs": [tensor(data=[0.0] * 48)], "parameters": []}, b"", "parameters must be a JSON object"),
    ({"inputs": [tensor(data=[0.0] * 48)], "id": 7}, b"", "id must be a string"),
    ({"inputs": [tensor(data=[0.0] * 48)], "outputs": "logits"}, b"", "must be a list of objects"),
    ({"inputs": [tensor(data=[0.0] * 48)], "outputs": [{"name": "top_k_labels", "parameters": {"classification": 2}}]},
     b"", "ask 'logits' for a classification"),
])
def test_malformed_requests_are_refused_with_a_message_naming_the_problem(request_, binary, phrase):
    with pytest.raises(ProtocolError) as error:
        if isinstance(request_, dict):
            parse(request_, binary)
        else:
            parse_request(json.dumps(request_).encode(), None, CONTRACT)
    assert phrase in str(error.value) and error.value.status == 400


@pytest.mark.parametrize("header_length", ["-1", "x", "100000"])
def test_a_header_length_outside_the_body_is_refused(header_length):
    with pytest.raises(ProtocolError, match="Inference-Header-Content-Length"):
        parse_request(b'{"inputs": []}', header_length, CONTRACT)


def test_unknown_model_or_version_is_404():
    CONTRACT.check_model("m")
    CONTRACT.check_model("m", "v1")
    for name, version in (("x", None), ("m", "v2")):
        with pytest.raises(ProtocolError) as error:
            CONTRACT.check_model(name, version)
        assert error.value.status == 404


def test_replies_hold_top_k_and_binary_outputs_that_tritonclient_decodes():
    logits = np.array([[0.0, 3.0, 1.0, 2.0, -1.0], [5.0, 0.0, 0.0, 0.0, 0.0]], np.float32)
    request = parse({"id": "r", "inputs": [tensor(shape=[2, 3, 4, 4], data=[0.0] * 96)], "parameters": {"top_k": 2},
                     "outputs": [{"name": "top_k_labels", "parameters": {"binary_data": True}},
                                 {"name": "logits", "parameters": {"binary_data": True}},
                                 {"name": "top_k_probabilities"},
                                 {"name": "logits", "parameters": {"classification": 2}}]})
    body, headers = encode_response(request, logits, CONTRACT, {"replica": "a"})
    length = int(headers["inference-header-content-length"])
    reply, binary = json.loads(body[:length]), body[length:]
    assert reply["id"] == "r" and reply["parameters"] == {"replica": "a"} and reply["model_version"] == "v1"
    labels, raw_logits, probabilities, classification = reply["outputs"]
    label_bytes = binary[:labels["parameters"]["binary_data_size"]]
    assert deserialize_bytes_tensor(label_bytes).astype(str).tolist() == ["class1", "class3", "class0", "class1"]
    assert labels["shape"] == [2, 2]
    np.testing.assert_array_equal(np.frombuffer(binary[len(label_bytes):], "<f4").reshape(2, 5), logits)
    expected = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(probabilities["data"], [expected[0, 1], expected[0, 3], expected[1, 0], expected[1, 1]],
                               rtol=1e-6)
    assert classification["data"] == ["3.000000:1:class1", "2.000000:3:class3", "5.000000:0:class0",
                                      "0.000000:1:class1"]


def test_a_reply_without_binary_outputs_is_plain_json_with_every_output():
    request = parse({"inputs": [tensor(data=[0.0] * 48)]})
    body, headers = encode_response(request, np.zeros((1, 5), np.float32), CONTRACT)
    assert headers == {"content-type": "application/json"}
    assert [o["name"] for o in json.loads(body)["outputs"]] == ["logits", "top_k_labels", "top_k_probabilities"]


def test_images_that_cannot_be_decoded_name_their_index_and_the_limit():
    with pytest.raises(ProtocolError, match=r"image_file\[1\]: not a readable image"):
        decode_files([png(), b"not an image"], CONTRACT)
    with pytest.raises(ProtocolError, match=r"image_file\[0\]: too large to decode \(more than 10,000 pixels\)"):
        decode_files([png(101, 100)], CONTRACT)
