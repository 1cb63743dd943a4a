"""Interop with the reference safetensors implementation (PyPI `safetensors`, Rust core).

Usage: python safetensors_interop.py ST_TOOL WORKDIR

1. Python writes a file with every dtype numpy has, bf16 as raw bits, NaN/Inf/-0/subnormal
   values, an empty tensor and a scalar; edgefuse reads it (st_tool dump) and every tensor's
   dtype, shape and bytes must match.
2. edgefuse re-writes that file (st_tool copy): as one file it must be byte-identical to what
   Python wrote; sharded, Python must read every shard (and the index) back bit-exactly.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
from safetensors import TensorSpec, deserialize, safe_open, serialize
from safetensors.numpy import load_file

tool, work = sys.argv[1], sys.argv[2]
shutil.rmtree(work, ignore_errors=True)
os.makedirs(work)
rng = np.random.default_rng(2026)

f32 = rng.standard_normal(1000).astype(np.float32)
f32[:6] = [np.nan, np.inf, -np.inf, -0.0, 1e-45, 3.4e38]
arrays = {
    "model.layers.0.mlp.up_proj.weight": f32.reshape(40, 25),
    "f16": rng.standard_normal((3, 7)).astype(np.float16),
    "f64": rng.standard_normal(5),
    "i8": rng.integers(-128, 127, 9, dtype=np.int8),
    "u8": rng.integers(0, 255, 10, dtype=np.uint8),
    "i16": rng.integers(-30000, 30000, 4, dtype=np.int16),
    "u16": rng.integers(0, 60000, 4, dtype=np.uint16),
    "i32": rng.integers(-(2**31), 2**31 - 1, 6, dtype=np.int32),
    "u32": rng.integers(0, 2**32 - 1, 6, dtype=np.uint32),
    "i64": rng.integers(-(2**62), 2**62, 3, dtype=np.int64),
    "u64": rng.integers(0, 2**63, 3, dtype=np.uint64),
    "bool": rng.integers(0, 2, 11).astype(np.bool_),
    "empty": np.zeros((2, 0), np.float32),
    "scalar": np.array(2.5, np.float32),
}
# bf16 has no numpy dtype: raw bits, including a NaN payload and -0.
bf16_bits = rng.integers(0, 65535, (17, 3), dtype=np.uint16)
bf16_bits.flat[:3] = [0x7FC1, 0x8000, 0x0001]

specs = {}
for name, a in arrays.items():
    a = np.ascontiguousarray(a)
    specs[name] = TensorSpec(dtype=a.dtype.name, shape=list(a.shape),
                             data_ptr=a.ctypes.data, data_len=a.nbytes)
    arrays[name] = a
specs["lm_head.weight.bf16"] = TensorSpec(dtype="bfloat16", shape=[17, 3],
                                          data_ptr=bf16_bits.ctypes.data,
                                          data_len=bf16_bits.nbytes)
reference = bytes(serialize(specs, metadata={"format": "pt"}))
src = os.path.join(work, "python.safetensors")
with open(src, "wb") as f:
    f.write(reference)

expected = {name: (kind, list(info["shape"]), bytes(info["data"]))
            for name, info in deserialize(reference) for kind in [info["dtype"]]}
assert len(expected) == 15, len(expected)

# 1. edgefuse reads what Python wrote.
dump = json.loads(subprocess.run([tool, "dump", src], check=True, capture_output=True,
                                 text=True).stdout)
assert dump["metadata"] == {"format": "pt"}, dump["metadata"]
assert set(dump["tensors"]) == set(expected), set(dump["tensors"]) ^ set(expected)
for name, (dtype, shape, data) in expected.items():
    got = dump["tensors"][name]
    assert got["dtype"] == dtype, (name, got["dtype"], dtype)
    assert got["shape"] == shape, (name, got["shape"], shape)
    assert bytes.fromhex(got["hex"]) == data, name
print(f"read: {len(expected)} tensors written by safetensors {__import__('safetensors').__version__}"
      " match bit for bit")

# 2a. One file written by edgefuse is byte-identical to the reference writer's.
single = os.path.join(work, "single")
subprocess.run([tool, "copy", src, single], check=True)
with open(os.path.join(single, "model.safetensors"), "rb") as f:
    mine = f.read()
assert mine == reference, "edgefuse's file differs from the reference serializer's"
print(f"write: single file byte-identical to the reference ({len(mine)} bytes)")

# 2b. Sharded: Python reads the index and every shard back.
sharded = os.path.join(work, "sharded")
subprocess.run([tool, "copy", src, sharded, "1000"], check=True)
with open(os.path.join(sharded, "model.safetensors.index.json")) as f:
    index = json.load(f)
assert set(index["weight_map"]) == set(expected)
assert index["metadata"]["total_size"] == sum(len(d) for _, _, d in expected.values())
shards = sorted(set(index["weight_map"].values()))
assert len(shards) >= 3, shards
seen = {}
for shard in shards:
    path = os.path.join(sharded, shard)
    with open(path, "rb") as f:
        blob = f.read()
    n = int.from_bytes(blob[:8], "little")
    assert (8 + n) % 8 == 0, shard
    with safe_open(path, framework="numpy") as h:
        assert h.metadata() == {"format": "pt"}
        names = list(h.keys())
    for name, info in deserialize(blob):
        assert index["weight_map"][name] == shard, name
        seen[name] = (info["dtype"], list(info["shape"]), bytes(info["data"]))
    numeric = {k for k in names if not k.endswith(".bf16")}
    loaded = load_file(path) if numeric == set(names) else None
    if loaded is not None:
        for k, v in loaded.items():
            assert v.tobytes() == arrays[k].tobytes() and v.dtype == arrays[k].dtype, k
assert seen == expected
print(f"write: {len(shards)} shards + index read back by safetensors bit for bit")
