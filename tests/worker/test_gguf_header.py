"""The GGUF header reader gives what the gguf package's own reader gives of a file's metadata
(every value type, arrays as their length) and its tensor names, and refuses what is no GGUF
file or ends early, naming the file."""

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter

from worker.gguf_header import read_gguf_header


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    writer = GGUFWriter(path, arch="llama")
    writer.add_uint32("llama.block_count", 2)
    writer.add_uint64("llama.context_length", 2**40)
    writer.add_int32("a.negative", -7)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_float64("a.double", 0.25)
    writer.add_bool("a.flag", True)
    writer.add_string("a.name", "héllo")
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "a", "bc", ""])
    writer.add_array("tokenizer.ggml.scores", [0.5, 1.5, 2.5])
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.add_tensor("blk.0.attn_q.weight", np.ones((8, 8), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_header_matches_the_gguf_packages_reading(gguf_file):
    header = read_gguf_header(gguf_file)
    reader = GGUFReader(gguf_file)
    expected = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):  # the reader's own entries for the file's framing
            continue
        value = field.contents()
        expected[key] = len(value) if isinstance(value, list) else value
    assert header.metadata == pytest.approx(expected)
    assert header.metadata["llama.context_length"] == 2**40
    assert header.metadata["a.name"] == "héllo"
    assert header.metadata["tokenizer.ggml.tokens"] == 4
    assert header.tensor_names == {t.name for t in reader.tensors}


def test_what_is_not_a_whole_gguf_header_is_refused_naming_the_file(gguf_file, tmp_path):
    data = open(gguf_file, "rb").read()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:100])
    with pytest.raises(ValueError, match=f"{cut}: the GGUF header ends early"):
        read_gguf_header(str(cut))
    other = tmp_path / "other.gguf"
    other.write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(ValueError, match=f"{other} is not a GGUF file"):
        read_gguf_header(str(other))
